// The playground: one form per operation the server's OpenAPI schema declares (a new family's
// routes appear here with no code of their own), live progress, results, "use as input".
import { api, el, fmtEta, followed, latestEvent, onJobEvent, session, toast } from "./app.js";

// Fields every form shows first; the rest are under "More options".
const MAIN_FIELDS = [
  "prompt", "negative_prompt", "model_id", "base_model_id", "instance_prompt", "class_prompt",
  "width", "height", "num_inference_steps", "steps", "guidance_scale", "seed", "samples",
  "scheduler", "strength", "num_frames", "fps", "scale", "max_train_steps", "training_type",
];
// Set by the console itself, never shown: the key, and answering at once (progress is pushed).
const HIDDEN_FIELDS = new Set(["key", "instant_response", "base64", "temp"]);
const TEXTAREAS = new Set(["prompt", "negative_prompt", "instance_prompt", "class_prompt"]);
const PATH_PREFERENCE = ["/api/v6/", "/api/v5/", "/api/v3/", "/api/v4/", "/api/v7/", "/api/"];

let spec = null;
let options = null;
// What "use as input" or "re-run" hands to the next form: {operation, values}.
let pending = null;

/** Open the playground on `operation` with `values` filled in (re-run, use as input). */
export function openInPlayground(operation, values) {
  pending = { operation, values };
  if (location.hash.startsWith("#/playground")) location.hash = `#/playground/${encodeURIComponent(operation)}/${Date.now()}`;
  else location.hash = `#/playground/${encodeURIComponent(operation)}`;
}

/** Operations by name ("text2img", "img2img", ...), each with its preferred path and schema. */
export async function operations() {
  if (!spec) spec = await (await fetch("/openapi.json")).json();
  const byName = new Map();
  for (const [path, methods] of Object.entries(spec.paths)) {
    const op = methods.post;
    const schema = op?.requestBody?.content?.["application/json"]?.schema;
    if (!schema || !schema.properties || path.includes("{")) continue;
    const enterprise = path.startsWith("/api/v1/enterprise") || path.startsWith("/api/v1/admin"); // admin only
    const name = (op.summary || path).split(" (")[0].trim();
    const rank = enterprise ? 99 : PATH_PREFERENCE.findIndex((p) => path.startsWith(p));
    const known = byName.get(name);
    if (!known || rank < known.rank) byName.set(name, { name, path, schema: resolve(schema), rank, tags: op.tags || [] });
  }
  return [...byName.values()].filter((op) => op.rank < 99 || session.me.is_admin);
}

function resolve(schema) {
  if (schema.$ref) return resolve(spec.components.schemas[schema.$ref.split("/").pop()]);
  return schema;
}

/** The JSON type a field takes: string | integer | number | boolean | array:<item> | any. */
function fieldType(schema) {
  const variants = schema.anyOf || schema.oneOf || [schema];
  for (const variant of variants.map(resolve)) {
    if (variant.type === "array") return `array:${variant.items?.type || "string"}`;
    if (variant.type && variant.type !== "null") return variant.type;
  }
  return "any";
}

function isImageField(name) {
  return /(^|_)(image|mask)$/.test(name) || name === "url" || name === "init_image" || name.endsWith("_image");
}

function pickerFor(name) {
  if (["model_id", "base_model_id"].includes(name)) return options.models.map((m) => m.model_id);
  if (name === "scheduler") return options.schedulers;
  if (["lora_model", "lora"].includes(name)) return options.loras;
  if (name.startsWith("controlnet")) return options.controlnets;
  if (name.startsWith("embeddings")) return options.embeddings;
  if (name === "vae") return options.vaes;
  return null;
}

export async function renderPlayground(container, [wanted]) {
  if (!options) options = await api("/api/v1/console/options");
  const ops = await operations();
  ops.sort((a, b) => opOrder(a.name) - opOrder(b.name) || a.name.localeCompare(b.name));
  let current = ops.find((op) => op.name === decodeURIComponent(wanted || "")) || ops.find((op) => op.name === "text2img") || ops[0];

  const tabs = el("div", { class: "tabs", role: "toolbar", "aria-label": "Operations" });
  const formBox = el("div");
  const requestBox = el("div", { class: "card" });
  const resultsBox = el("div", { class: "card", id: "results" }, el("h2", {}, "Results"), el("p", { class: "muted", id: "results-empty" }, "Submit a request: its progress and outputs appear here."));
  container.append(
    el("h1", {}, "Playground"),
    tabs,
    el("div", { class: "grid" }, el("div", {}, formBox), el("div", {}, resultsBox, requestBox)),
  );

  const jobs = new Map(); // job id -> its card's parts
  const unsubscribe = onJobEvent((name, data) => {
    const card = jobs.get(data.id);
    if (card) updateCard(card, name, data);
  });

  function draw() {
    tabs.replaceChildren(
      ...ops.map((op) =>
        el("button", { type: "button", "aria-pressed": String(op === current), onclick: () => { current = op; draw(); } }, op.name),
      ),
    );
    const values = pending && pending.operation === current.name ? pending.values : {};
    pending = null;
    const form = buildForm(current, values, requestBox, submit);
    formBox.replaceChildren(form);
  }

  async function submit(op, body) {
    const button = formBox.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const answer = await api(op.path, { method: "POST", body });
      const id = answer.id ?? answer.data?.id ?? answer.training_id;
      if (id === undefined || id === null) {
        toast("Answered: " + (answer.message || answer.status));
        return;
      }
      document.getElementById("results-empty")?.remove();
      const card = jobCard(op, id, answer);
      jobs.set(id, card);
      resultsBox.querySelector("h2").after(card.root);
      followed.add(id);
      if (answer.status === "success") updateCard(card, "done", { id, status: "success", output: [answer.output].flat() });
      if (answer.status === "failed") updateCard(card, "failed", { id, status: "failed", error: answer.message });
      const seen = latestEvent(id);
      if (seen) updateCard(card, seen.name, seen);
    } catch (error) {
      toast(`Refused: ${error.message}`);
      formBox.querySelector(".form-error").textContent = error.message;
    } finally {
      button.disabled = false;
    }
  }

  function jobCard(op, id, answer) {
    const bar = el("div");
    const label = el("span", { class: "status-text" }, "queued");
    const root = el("div", { class: "job-card", "data-job": id },
      el("div", { class: "row" }, el("strong", {}, `${op.name} #${id}`), el("span", { class: "pill queued job-status" }, "queued"), label),
      el("div", { class: "progress", role: "progressbar", "aria-label": `Progress of job ${id}`, "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0" }, bar),
      el("div", { class: "gallery" }),
    );
    if (answer.eta) label.textContent = `ETA ${fmtEta(answer.eta)}`;
    return { root, bar, label, op };
  }

  function updateCard(card, name, data) {
    const pill = card.root.querySelector(".job-status");
    const status = { queued: "queued", started: "processing", step: "processing", done: "success", failed: "failed" }[name];
    pill.textContent = status;
    pill.className = `pill ${status} job-status`;
    const total = data.total_steps || 0;
    const percent = status === "success" ? 100 : total ? Math.round((100 * (data.step || 0)) / total) : 0;
    card.bar.style.width = `${percent}%`;
    card.bar.parentElement.setAttribute("aria-valuenow", String(percent));
    if (status === "queued") card.label.textContent = `position ${data.queue_position ?? "?"}, ETA ${fmtEta(data.eta)}`;
    if (status === "processing") card.label.textContent = `step ${data.step}/${total}, ETA ${fmtEta(data.eta)}`;
    if (status === "failed") card.label.textContent = data.error || "failed";
    if (status === "success") {
      card.label.textContent = data.generation_time ? `done in ${data.generation_time} s` : "done";
      showOutputs(card.root.querySelector(".gallery"), data.output || [], ops);
      followed.delete(data.id);
    }
  }

  draw();
  return unsubscribe;
}

function opOrder(name) {
  const order = ["text2img", "img2img", "inpaint", "text2video", "img2video", "video2video"];
  const index = order.indexOf(name);
  return index < 0 ? order.length : index;
}

/** Images in a gallery, videos in a player, anything else as a link; each can feed the next job. */
export function showOutputs(gallery, urls, ops) {
  gallery.replaceChildren();
  for (const url of urls) {
    const isVideo = /\.(mp4|webm|gif)$/i.test(url) && !/\.gif$/i.test(url);
    const media = isVideo
      ? el("video", { src: url, controls: true, loop: true, muted: true, preload: "metadata", "aria-label": "Generated video" })
      : /\.(png|jpe?g|webp|gif)$/i.test(url)
        ? el("img", { src: url, alt: "Generated image" })
        : el("a", { href: url }, url.split("/").pop());
    const targets = (ops || []).filter((op) => inputField(op, isVideo));
    const select = el("select", { "aria-label": "Use as input for" }, el("option", { value: "" }, "Use as input…"), ...targets.map((op) => el("option", { value: op.name }, op.name)));
    select.addEventListener("change", () => {
      const op = targets.find((o) => o.name === select.value);
      if (op) openInPlayground(op.name, { [inputField(op, isVideo)]: url });
    });
    gallery.append(el("figure", {}, media, el("figcaption", {}, targets.length ? select : null, el("a", { class: "button secondary", href: url, download: "" }, "Download"))));
  }
}

/** The field an operation takes its main input in (init_image, image, url...), if any. */
function inputField(op, video) {
  const names = Object.keys(op.schema.properties).filter((name) => !notForThis(op, name));
  if (video) return names.find((name) => name === "init_video");
  return names.find((name) => name === "init_image") || names.find((name) => isImageField(name) && name !== "mask_image");
}

// ---- the form ---------------------------------------------------------------------------------

function buildForm(op, values, requestBox, submit) {
  const properties = op.schema.properties;
  const inputs = new Map(); // field -> () => value or undefined
  const main = el("div");
  const more = el("div");
  const form = el("form", { class: "card", "aria-label": `${op.name} request` });
  const names = Object.keys(properties).filter((name) => !HIDDEN_FIELDS.has(name) && !notForThis(op, name));
  names.sort((a, b) => rank(a) - rank(b));
  let imageWidget = null;
  for (const name of names) {
    const type = fieldType(properties[name]);
    const id = `f-${name}`;
    let control;
    let read;
    if (name === "mask_image") {
      const mask = maskField(id, () => imageWidget?.value());
      control = mask.root;
      read = mask.value;
      form.addEventListener("input-image", () => mask.refresh());
    } else if (isImageField(name) || name === "init_video" || name === "images") {
      const widget = fileField(id, name, values[name], form);
      if (!imageWidget && name !== "images") imageWidget = widget;
      control = widget.root;
      read = widget.value;
    } else if (type === "boolean") {
      control = el("select", { id }, el("option", { value: "" }, "(default)"), el("option", { value: "true" }, "yes"), el("option", { value: "false" }, "no"));
      if (values[name] !== undefined) control.value = String(values[name]);
      read = () => (control.value === "" ? undefined : control.value === "true");
    } else {
      const choices = pickerFor(name);
      if (choices && type !== "array:string") {
        control = el("select", { id }, el("option", { value: "" }, "(default)"), ...choices.map((c) => el("option", { value: c }, c)));
      } else if (TEXTAREAS.has(name)) {
        control = el("textarea", { id });
      } else {
        const listId = choices ? `${id}-list` : null;
        control = el("input", { id, type: type === "integer" || type === "number" ? "number" : "text", step: type === "number" ? "any" : null, list: listId });
        if (choices) control = el("span", {}, control, el("datalist", { id: listId }, ...choices.map((c) => el("option", { value: c }))));
      }
      const input = control.tagName === "SPAN" ? control.firstChild : control;
      if (values[name] !== undefined && values[name] !== null) input.value = Array.isArray(values[name]) ? values[name].join(",") : values[name];
      read = () => parseValue(input.value, type);
    }
    inputs.set(name, read);
    const hint = type.startsWith("array") ? " (comma-separated)" : "";
    const field = el("div", { class: "field" }, el("label", { for: id }, name.replaceAll("_", " "), el("small", {}, hint)), control);
    (MAIN_FIELDS.includes(name) || isImageField(name) || name === "init_video" || name === "images" ? main : more).append(field);
  }
  const errorBox = el("p", { class: "form-error error", role: "alert" });
  form.append(
    el("h2", {}, op.name, " ", el("small", { class: "muted" }, op.path)),
    main,
    more.childElementCount ? el("details", { class: "more" }, el("summary", {}, "More options"), more) : null,
    el("div", { class: "row", style: "margin-top:.8rem" }, el("button", { type: "submit", id: "generate" }, "Generate")),
    errorBox,
  );

  function body() {
    const result = {};
    for (const [name, read] of inputs) {
      const value = read();
      if (value !== undefined && value !== "") result[name] = value;
    }
    if ("instant_response" in properties) result.instant_response = true;
    return result;
  }
  function showRequest() {
    const payload = { key: "YOUR_KEY", ...body() };
    const json = JSON.stringify(payload, shorten, 2);
    const curl = `curl -X POST '${location.origin}${op.path}' \\\n  -H 'Content-Type: application/json' \\\n  -d '${JSON.stringify(payload, shorten).replaceAll("'", "'\\''")}'`;
    const copy = (text) => el("button", { type: "button", class: "secondary", onclick: () => navigator.clipboard?.writeText(text).then(() => toast("Copied")) }, "Copy");
    const full = { key: session.key ? "YOUR_KEY" : "", ...body() };
    requestBox.replaceChildren(
      el("h2", {}, "The request"),
      el("div", { class: "row" }, el("strong", {}, "curl"), copy(curl.replace(JSON.stringify(payload, shorten), JSON.stringify(full)))),
      el("pre", { class: "code", tabindex: "0", id: "request-curl" }, curl),
      el("div", { class: "row" }, el("strong", {}, "JSON"), copy(JSON.stringify(full, null, 2))),
      el("pre", { class: "code", tabindex: "0", id: "request-json" }, json),
    );
  }
  form.addEventListener("input", showRequest);
  form.addEventListener("change", showRequest);
  form.addEventListener("input-image", showRequest);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    errorBox.textContent = "";
    submit(op, body());
  });
  showRequest();
  return form;
}

/** Families share request models (text2img, img2img and inpaint take one): an operation from
 * text leaves out the input files, and only inpainting-like operations draw a mask. */
function notForThis(op, name) {
  const input = isImageField(name) || name === "init_video";
  if (input && /^text|text2|text-to/.test(op.name)) return true;
  return name === "mask_image" && /img2img|image-to-image|video/.test(op.name);
}

function rank(name) {
  const index = MAIN_FIELDS.indexOf(name);
  if (index >= 0) return index;
  if (isImageField(name) || name === "init_video" || name === "images") return 50;
  return 100;
}

/** Data URLs are long: the request shown keeps their start and size. */
function shorten(_key, value) {
  if (typeof value === "string" && value.startsWith("data:") && value.length > 80) {
    return `${value.slice(0, 40)}…(${Math.round(value.length / 1024)} kB)`;
  }
  return value;
}

function parseValue(text, type) {
  const value = text.trim();
  if (value === "") return undefined;
  if (type === "integer") return Number.parseInt(value, 10);
  if (type === "number") return Number.parseFloat(value);
  if (type.startsWith("array:")) {
    const items = value.split(",").map((v) => v.trim()).filter(Boolean);
    return type === "array:number" || type === "array:integer" ? items.map(Number) : items;
  }
  if (type === "any" && /^[[{]/.test(value)) {
    try {
      return JSON.parse(value);
    } catch {
      return value;
    }
  }
  return value;
}

/** An image (or video) input: a URL, a file chosen or dropped (sent as a data URL). */
function fileField(id, name, initial, form) {
  let value = initial || "";
  const preview = el("img", { class: "preview", alt: `${name} preview`, hidden: !value || name === "init_video" });
  if (value) preview.src = value;
  const url = el("input", { id, type: "text", placeholder: "an image URL, or choose / drop a file", value: value.startsWith?.("data:") ? "" : value });
  const file = el("input", { type: "file", accept: name === "init_video" ? "video/*" : "image/*", "aria-label": `${name} file` });
  const drop = el("div", { class: "drop" }, url, el("div", { class: "row", style: "margin-top:.3rem" }, file), preview);
  const set = (next) => {
    value = next;
    preview.hidden = !value || name === "init_video";
    if (value) preview.src = value;
    form.dispatchEvent(new Event("input-image"));
  };
  url.addEventListener("input", () => set(url.value.trim()));
  const read = (blob) => {
    const reader = new FileReader();
    reader.onload = () => {
      url.value = "";
      set(reader.result);
    };
    reader.readAsDataURL(blob);
  };
  file.addEventListener("change", () => file.files[0] && read(file.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const blob = event.dataTransfer.files[0];
    if (blob) read(blob);
    else if (event.dataTransfer.getData("text/uri-list")) set(event.dataTransfer.getData("text/uri-list"));
  });
  return { root: drop, value: () => (name === "images" && value ? [value] : value || undefined) };
}

/** The inpaint mask, painted over the input image: white is repainted, black is kept. */
function maskField(id, imageValue) {
  const canvas = el("canvas", { id, width: 512, height: 512, tabindex: "0", "aria-label": "Mask: paint the area to repaint" });
  const wrap = el("div", { class: "mask-wrap" }, canvas);
  const brush = el("input", { type: "range", min: "2", max: "96", value: "24", "aria-label": "Brush size" });
  const context = canvas.getContext("2d");
  let painted = false;
  const clear = () => {
    context.fillStyle = "#000";
    context.fillRect(0, 0, canvas.width, canvas.height);
    painted = false;
    canvas.dispatchEvent(new Event("input", { bubbles: true }));
  };
  const refresh = () => {
    const source = imageValue();
    wrap.style.backgroundImage = source ? `url("${source}")` : "";
    if (!source) return;
    const image = new Image();
    image.onload = () => {
      if (image.naturalWidth !== canvas.width || image.naturalHeight !== canvas.height) {
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
        clear();
      }
    };
    image.src = source;
  };
  clear();
  let drawing = false;
  let last = null;
  // The brush is sized in screen pixels, whatever the image's own size; strokes join the points.
  const paint = (event) => {
    const box = canvas.getBoundingClientRect();
    const scale = canvas.width / box.width;
    const point = [(event.clientX - box.left) * scale, ((event.clientY - box.top) / box.height) * canvas.height];
    context.strokeStyle = context.fillStyle = "#fff";
    context.lineWidth = Number(brush.value) * scale;
    context.lineCap = "round";
    context.beginPath();
    context.moveTo(...(last || point));
    context.lineTo(...point);
    context.stroke();
    last = point;
    painted = true;
  };
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    last = null;
    canvas.setPointerCapture?.(event.pointerId);
    paint(event);
  });
  canvas.addEventListener("pointermove", (event) => drawing && paint(event));
  const stop = () => {
    if (!drawing) return;
    drawing = false;
    canvas.dispatchEvent(new Event("input", { bubbles: true }));
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointerleave", stop);
  // Keyboard: Enter paints the whole image (a mask without a pointer), Delete clears it.
  canvas.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      context.fillStyle = "#fff";
      context.fillRect(0, 0, canvas.width, canvas.height);
      painted = true;
      canvas.dispatchEvent(new Event("input", { bubbles: true }));
    }
    if (event.key === "Delete" || event.key === "Backspace") clear();
  });
  const root = el("div", {}, wrap, el("div", { class: "row" }, el("label", {}, "Brush", brush), el("button", { type: "button", class: "secondary", onclick: clear }, "Clear mask")));
  setTimeout(refresh, 0);
  return { root, value: () => (painted ? canvas.toDataURL("image/png") : undefined), refresh };
}
