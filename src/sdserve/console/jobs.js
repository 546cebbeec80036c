// My jobs: the key's history with filters, and one job's details (request, meta, timings by stage,
// webhook deliveries), with re-run, cancel, delete and download.
import { api, el, fmtEta, fmtTime, onJobEvent, session, toast } from "./app.js";
import { openInPlayground, operations, showOutputs } from "./playground.js";

const STATUSES = ["", "active", "queued", "processing", "success", "failed"];

export async function renderJobs(container, [selected]) {
  const ops = await operations();
  const kind = el("select", { id: "filter-kind" }, el("option", { value: "" }, "any"));
  const status = el("select", { id: "filter-status" }, ...STATUSES.map((s) => el("option", { value: s }, s || "any")));
  const model = el("input", { id: "filter-model", type: "text", placeholder: "any model" });
  const table = el("tbody");
  const detail = el("div", { id: "job-detail" });
  container.append(
    el("h1", {}, session.me.is_admin ? "Jobs (every key)" : "My jobs"),
    el("div", { class: "card" },
      el("div", { class: "row" },
        el("div", {}, el("label", { for: "filter-kind" }, "Kind"), kind),
        el("div", {}, el("label", { for: "filter-status" }, "Status"), status),
        el("div", {}, el("label", { for: "filter-model" }, "Model"), model),
      ),
    ),
    el("div", { class: "grid" },
      el("div", { class: "card" }, el("table", { id: "jobs-table" },
        el("thead", {}, el("tr", {}, el("th", {}, "Id"), el("th", {}, "Kind"), el("th", {}, "Status"), el("th", {}, "Model"), el("th", {}, "Output"))),
        table)),
      detail,
    ),
  );

  async function load() {
    const { jobs, kinds } = await api("/api/v1/jobs", { query: { kind: kind.value, status: status.value, model_id: model.value.trim() } });
    const chosen = kind.value;
    kind.replaceChildren(el("option", { value: "" }, "any"), ...kinds.map((k) => el("option", { value: k }, k)));
    kind.value = chosen;
    table.replaceChildren(...jobs.map((job) => {
      const first = job.output[0];
      const thumb = first && /\.(png|jpe?g|webp|gif)$/i.test(first) ? el("img", { class: "thumb", src: first, alt: "" }) : first ? "file" : "";
      const open = () => { location.hash = `#/jobs/${job.id}`; };
      return el("tr", { class: "clickable", tabindex: "0", "data-job": job.id, onclick: open, onkeydown: (e) => e.key === "Enter" && open() },
        el("td", {}, `#${job.id}`), el("td", {}, job.kind), el("td", {}, el("span", { class: `pill ${job.status}` }, job.status)),
        el("td", {}, job.model_id), el("td", {}, thumb));
    }));
    if (!jobs.length) table.append(el("tr", {}, el("td", { colspan: "5", class: "muted" }, "No jobs match.")));
  }
  for (const control of [kind, status]) control.addEventListener("change", load);
  model.addEventListener("input", () => { clearTimeout(model.timer); model.timer = setTimeout(load, 300); });
  await load();
  if (selected) await showDetail(detail, Number(selected), ops, load);

  let timer = null;
  const off = onJobEvent((name) => {
    if (name === "queued" || name === "done" || name === "failed") {
      clearTimeout(timer);
      timer = setTimeout(load, 300);
    }
  });
  return off;
}

async function showDetail(box, id, ops, reload) {
  let job;
  try {
    ({ job } = await api(`/api/v1/jobs/${id}`));
  } catch (error) {
    box.replaceChildren(el("div", { class: "card" }, el("p", { class: "error" }, error.message)));
    return;
  }
  const gallery = el("div", { class: "gallery" });
  showOutputs(gallery, job.output, ops);
  const op = ops.find((o) => o.name === job.kind);
  // A job's kind names its operation (text2img) or only its engine's work (t2v): then ask which.
  const values = { ...job.meta, ...job.request };
  let rerun = op ? el("button", { type: "button", onclick: () => openInPlayground(op.name, values) }, "Re-run") : null;
  if (!op) {
    rerun = el("select", { "aria-label": "Re-run as" }, el("option", { value: "" }, "Re-run as…"), ...ops.map((o) => el("option", { value: o.name }, o.name)));
    rerun.addEventListener("change", () => rerun.value && openInPlayground(rerun.value, values));
  }
  const active = job.status === "queued" || job.status === "processing";
  const cancel = active ? el("button", { type: "button", class: "danger", onclick: async () => {
    await api(`/api/v1/jobs/${id}/cancel`, { method: "POST", body: {} });
    toast(`Job ${id} cancelled`);
    reload();
    showDetail(box, id, ops, reload);
  } }, "Cancel") : null;
  const remove = !active ? el("button", { type: "button", class: "danger", onclick: async () => {
    if (!confirm(`Delete job ${id} and its files?`)) return;
    await api(`/api/v1/jobs/${id}`, { method: "DELETE" });
    toast(`Job ${id} deleted`);
    box.replaceChildren();
    reload();
  } }, "Delete") : null;
  const timings = Object.entries(job.timings || {});
  box.replaceChildren(el("div", { class: "card" },
    el("h2", {}, `Job #${job.id} `, el("span", { class: `pill ${job.status}` }, job.status)),
    el("p", { class: "muted" }, `${job.kind} on ${job.model_id} · created ${fmtTime(job.created_at)}`,
      job.eta !== undefined ? ` · position ${job.queue_position}, ETA ${fmtEta(job.eta)}` : "",
      job.owner ? ` · owner ${job.owner}` : ""),
    job.error ? el("p", { class: "error" }, job.error) : null,
    el("div", { class: "row" }, rerun, cancel, remove),
    gallery,
    el("h2", { style: "margin-top:1rem" }, "Timings by stage"),
    timings.length
      ? el("table", {}, el("tbody", {}, ...timings.map(([stage, seconds]) => el("tr", {}, el("th", {}, stage), el("td", {}, stage === "batch_size" ? seconds : `${seconds} s`)))))
      : el("p", { class: "muted" }, "None yet."),
    el("h2", { style: "margin-top:1rem" }, "Webhook deliveries"),
    job.webhook
      ? el("table", {}, el("tbody", {}, ...job.webhook_deliveries.map((d) => el("tr", {}, el("td", {}, `#${d.attempt}`), el("td", {}, fmtTime(d.sent_at)), el("td", {}, d.ok ? "delivered" : d.error || `HTTP ${d.status_code}`)))))
      : el("p", { class: "muted" }, "No webhook."),
    el("h2", { style: "margin-top:1rem" }, "Request"),
    el("pre", { class: "code", tabindex: "0" }, JSON.stringify(job.request, null, 2)),
    el("h2", {}, "Meta"),
    el("pre", { class: "code", tabindex: "0" }, JSON.stringify(job.meta, null, 2)),
  ));
}
