// Administration (admin key): keys, plans, models and trainings, through the server's own admin
// endpoints (/api/v1/admin/keys, /api/v1/enterprise/plans, get_all_models, load_model, ...).
import { api, el, fmtTime, onJobEvent, toast } from "./app.js";

export async function renderAdmin(container) {
  const keys = el("div", { class: "card", id: "admin-keys" });
  const plans = el("div", { class: "card", id: "admin-plans" });
  const models = el("div", { class: "card", id: "admin-models" });
  const trainings = el("div", { class: "card", id: "admin-trainings" });
  container.append(el("h1", {}, "Administration"), keys, plans, models, trainings);
  let planNames = [];

  async function loadPlans() {
    const list = (await api("/api/v1/enterprise/plans", { method: "POST", body: {} })).plans;
    planNames = list.map((p) => p.name);
    const form = el("form", { class: "row", "aria-label": "Create or change a plan" },
      field("plan-name", "Plan name", el("input", { id: "plan-name", required: true })),
      field("plan-requests", "Requests a month", el("input", { id: "plan-requests", type: "number", min: "0" })),
      field("plan-queue", "Queue limit", el("input", { id: "plan-queue", type: "number", min: "0" })),
      field("plan-models", "Trainings included", el("input", { id: "plan-models", type: "number", min: "0" })),
      el("button", { type: "submit" }, "Save plan"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      await api("/api/v1/enterprise/plans", { method: "POST", body: {
        plan_name: form.querySelector("#plan-name").value, requests_per_month: form.querySelector("#plan-requests").value,
        queue_limit: form.querySelector("#plan-queue").value, included_models: form.querySelector("#plan-models").value,
      } });
      toast("Plan saved");
      await loadPlans();
      await loadKeys();
    });
    plans.replaceChildren(el("h2", {}, "Plans and quotas"),
      table(["Plan", "Requests a month", "Queue limit", "Trainings", "Self-service"],
        list.map((p) => [p.name, p.requests_per_month ?? "no cap", p.queue_limit ?? "server default", p.included_models, p.self_service ? "yes" : "no"])),
      form);
  }

  async function loadKeys(created) {
    const list = (await api("/api/v1/admin/keys")).keys;
    const form = el("form", { class: "row", "aria-label": "Create a key" },
      field("key-label", "Label", el("input", { id: "key-label" })),
      field("key-plan", "Plan", planSelect("key-plan", "")),
      el("button", { type: "submit" }, "Create key"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const answer = await api("/api/v1/admin/keys", { method: "POST", body: { label: form.querySelector("#key-label").value, plan: form.querySelector("#key-plan").value } });
      await loadKeys(answer.key);
    });
    const rows = list.map((k) => {
      const plan = planSelect(`plan-of-${k.id}`, k.plan || "", `Plan of key ${k.prefix}`);
      plan.disabled = k.revoked;
      plan.addEventListener("change", async () => {
        await api(`/api/v1/admin/keys/${k.id}/plan`, { method: "POST", body: { plan: plan.value } });
        toast(`Key ${k.prefix}: plan ${plan.value || "none"}`);
      });
      const revoke = k.revoked ? "revoked" : el("button", { type: "button", class: "danger", "data-revoke": k.prefix, onclick: async () => {
        if (!confirm(`Revoke key ${k.prefix}…? Its clients lose access at once.`)) return;
        await api(`/api/v1/admin/keys/${k.id}/revoke`, { method: "POST", body: {} });
        toast(`Key ${k.prefix} revoked`);
        loadKeys();
      } }, "Revoke");
      return [k.prefix + "…", k.label, plan, String(k.used_this_month), fmtTime(k.created_at), revoke];
    });
    const shown = created ? el("p", {}, "New key (shown once, copy it now): ", el("span", { class: "key-shown", id: "new-key" }, created)) : "";
    keys.replaceChildren(el("h2", {}, "Keys"), shown,
      table(["Key", "Label", "Plan", "Requests this month", "Created", "Actions"], rows, "keys-table"), form);
  }

  function planSelect(id, value, label) {
    const select = el("select", { id, "aria-label": label }, el("option", { value: "" }, "(none)"), ...planNames.map((n) => el("option", { value: n }, n)));
    select.value = value;
    return select;
  }

  async function loadModels() {
    const [{ models: list }, status] = await Promise.all([
      api("/api/v1/enterprise/get_all_models", { method: "POST", body: {} }),
      api("/api/v1/admin/workers"),
    ]);
    const holders = (id) => status.workers.filter((w) => w.resident.includes(id)).map((w) => w.worker_id).join(", ");
    const form = el("form", { class: "row", "aria-label": "Import a model" },
      field("import-id", "Model id", el("input", { id: "import-id", required: true })),
      field("import-url", "URL or hub id", el("input", { id: "import-url", required: true })),
      field("import-category", "Category", el("select", { id: "import-category" }, ...["stable_diffusion", "stable_diffusion_xl", "lora", "embeddings", "vae", "controlnet"].map((c) => el("option", { value: c }, c)))),
      el("button", { type: "submit" }, "Import"));
    const progress = el("p", { id: "import-progress", "aria-live": "polite" });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const answer = await api("/api/v1/enterprise/load_model", { method: "POST", body: {
        model_id: form.querySelector("#import-id").value, url: form.querySelector("#import-url").value,
        model_category: form.querySelector("#import-category").value,
      } });
      progress.textContent = `Import job #${answer.id} queued`;
      const off = onJobEvent((name, data) => {
        if (data.id !== answer.id) return;
        progress.textContent = `Import job #${answer.id}: ${name}${data.total_steps ? ` ${Math.round((100 * data.step) / data.total_steps)}%` : ""}${data.error ? ` — ${data.error}` : ""}`;
        if (name === "done" || name === "failed") { off(); loadModels(); }
      });
    });
    const rows = list.map((m) => [m.model_id, m.source, m.model_category || "", holders(m.model_id) || "none",
      el("span", { class: "row" },
        el("button", { type: "button", class: "secondary", onclick: async () => {
          const answer = await api("/api/v1/enterprise/verify_model", { method: "POST", body: { model_id: m.model_id } }).catch((e) => ({ message: e.message }));
          toast(`${m.model_id}: ${answer.message}`);
        } }, "Verify"),
        m.source === "imported" ? el("button", { type: "button", class: "danger", onclick: async () => {
          if (!confirm(`Delete ${m.model_id} and its files?`)) return;
          await api("/api/v1/enterprise/delete_model", { method: "POST", body: { model_id: m.model_id } });
          toast(`${m.model_id} deleted`);
          loadModels();
        } }, "Delete") : null)]);
    models.replaceChildren(el("h2", {}, "Models"), table(["Model", "Source", "Category", "Resident on", "Actions"], rows), form, progress);
  }

  async function loadTrainings() {
    const list = (await api("/api/v1/trainings")).trainings;
    const bar = (t) => {
      const percent = t.total_steps ? Math.round((100 * t.step) / t.total_steps) : 0;
      return el("div", { class: "progress", role: "progressbar", "aria-label": `Training ${t.training_id}`, "aria-valuenow": String(percent) }, el("div", { style: `width:${percent}%` }));
    };
    trainings.replaceChildren(el("h2", {}, "Trainings"),
      list.length
        ? table(["Training", "Type", "Base model", "Stage", "Steps", "Progress", "Created"],
          list.map((t) => [t.training_id, t.kind, t.base_model_id, t.stage, `${t.step}/${t.total_steps}`, bar(t), fmtTime(t.created_at)]), "trainings-table")
        : el("p", { class: "muted" }, "No training yet."));
  }

  await loadPlans();
  await Promise.all([loadKeys(), loadModels(), loadTrainings()]);
  const off = onJobEvent((name, data) => {
    if (data.kind.startsWith("train")) loadTrainings();
  });
  return off;
}

function field(id, label, control) {
  return el("div", {}, el("label", { for: id }, label), control);
}

function table(headers, rows, id) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))));
}
