// Queue and workers (admin): every key's queued and running jobs, the workers, and a live chart of
// images/s and queue depth over the last hour.
import { api, el, fmtEta, onJobEvent, toast } from "./app.js";

const SVG = "http://www.w3.org/2000/svg";

export async function renderQueue(container) {
  const chart = document.createElementNS(SVG, "svg");
  chart.setAttribute("class", "chart");
  chart.setAttribute("role", "img");
  chart.setAttribute("aria-label", "Images per second and queue depth, last hour");
  const summary = el("p", { class: "legend" });
  const queue = el("tbody");
  const workers = el("tbody");
  container.append(
    el("h1", {}, "Queue and workers"),
    el("div", { class: "card" }, el("h2", {}, "Last hour"), chart, summary),
    el("div", { class: "card" }, el("h2", {}, "Queued and running"), el("table", { id: "queue-table" },
      el("thead", {}, el("tr", {}, ...["Job", "Key", "Kind", "Model", "Status", "Progress", "ETA", "Actions"].map((h) => el("th", {}, h)))), queue)),
    el("div", { class: "card" }, el("h2", {}, "Workers"), el("table", { id: "workers-table" },
      el("thead", {}, el("tr", {}, ...["Worker", "Device", "GPU", "State", "Resident models", "Batch", "Actions"].map((h) => el("th", {}, h)))), workers)),
  );

  async function loadQueue() {
    const { jobs } = await api("/api/v1/admin/queue");
    queue.replaceChildren(...jobs.map((job) => {
      const percent = job.total_steps ? Math.round((100 * job.step) / job.total_steps) : 0;
      return el("tr", { "data-job": job.id },
        el("td", {}, `#${job.id}`), el("td", {}, job.owner), el("td", {}, job.kind), el("td", {}, job.model_id),
        el("td", {}, el("span", { class: `pill ${job.status}` }, job.status), job.status === "queued" ? ` #${job.queue_position}` : ""),
        el("td", {}, el("div", { class: "progress", role: "progressbar", "aria-label": `Progress of job ${job.id}`, "aria-valuenow": String(percent) }, el("div", { style: `width:${percent}%` }))),
        el("td", {}, fmtEta(job.eta)),
        el("td", {}, el("button", { type: "button", class: "danger", onclick: async () => {
          await api(`/api/v1/jobs/${job.id}/cancel`, { method: "POST", body: {} });
          toast(`Job ${job.id} cancelled`);
          loadQueue();
        } }, "Cancel")));
    }));
    if (!jobs.length) queue.append(el("tr", {}, el("td", { colspan: "8", class: "muted" }, "The queue is empty.")));
  }

  async function loadWorkers() {
    const list = (await api("/api/v1/admin/workers")).workers;
    workers.replaceChildren(...list.map((w) => {
      const draining = w.state === "draining";
      const action = draining ? "resume" : "drain";
      return el("tr", {},
        el("td", {}, w.worker_id), el("td", {}, w.device), el("td", {}, w.gpu_name ? `${w.gpu_name} (${w.gpu_memory_mb} MB)` : "none"),
        el("td", {}, el("span", { class: `pill ${w.state}` }, w.state)), el("td", {}, w.resident.join(", ") || "none"),
        el("td", {}, String(w.batch_size)),
        el("td", {}, el("button", { type: "button", class: "secondary", onclick: async () => {
          await api(`/api/v1/admin/workers/${encodeURIComponent(w.worker_id)}/${action}`, { method: "POST", body: {} });
          toast(`${action} sent to ${w.worker_id}`);
          setTimeout(loadWorkers, 1200);
        } }, draining ? "Resume" : "Drain")));
    }));
    if (!list.length) workers.append(el("tr", {}, el("td", { colspan: "7", class: "muted" }, "No worker seen in the last 2 minutes.")));
  }

  async function loadChart() {
    const data = await api("/api/v1/admin/throughput");
    drawChart(chart, data);
    const done = data.outputs.reduce((a, b) => a + b, 0);
    summary.replaceChildren(
      el("span", { style: "color:#2457c5" }, `■ images/s (peak ${Math.max(...data.images_per_second).toFixed(3)})`),
      el("span", { style: "color:#9a5200" }, `■ queue depth (now ${data.queue_depth.at(-1)})`),
      el("span", {}, `${done} outputs in the hour`),
    );
  }

  await Promise.all([loadQueue(), loadWorkers(), loadChart()]);
  let pending = null;
  const off = onJobEvent(() => {
    if (pending) return;
    pending = setTimeout(() => { pending = null; loadQueue(); }, 400);
  });
  const timers = [setInterval(loadWorkers, 5000), setInterval(loadChart, 10000), setInterval(loadQueue, 5000)];
  return () => { off(); timers.forEach(clearInterval); };
}

function drawChart(svg, data) {
  const width = 600;
  const height = 180;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.replaceChildren();
  const line = (values, color) => {
    const top = Math.max(...values, 1e-9);
    const step = width / Math.max(values.length - 1, 1);
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 10 - (v / top) * (height - 20)).toFixed(1)}`).join(" ");
    const path = document.createElementNS(SVG, "polyline");
    path.setAttribute("points", points);
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", color);
    path.setAttribute("stroke-width", "2");
    svg.append(path);
  };
  const axis = document.createElementNS(SVG, "line");
  for (const [k, v] of Object.entries({ x1: 0, y1: height - 10, x2: width, y2: height - 10, class: "axis" })) axis.setAttribute(k, v);
  svg.append(axis);
  line(data.images_per_second, "#2457c5");
  line(data.queue_depth, "#9a5200");
}
