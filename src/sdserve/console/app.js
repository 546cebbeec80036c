// The console's core: the key kept in this browser, API calls, the live job event stream (with
// polling as the fallback), and a hash router over the pages.
import { renderPlayground } from "./playground.js";
import { renderJobs } from "./jobs.js";
import { renderQueue } from "./queue.js";
import { renderAdmin } from "./admin.js";

const KEY_STORAGE = "sdserve.key";

export const session = { key: localStorage.getItem(KEY_STORAGE) || "", me: null };

/** Build an element: el("button", {onclick, class: "x"}, "text", child...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function toast(message) {
  const box = el("div", {}, message);
  document.getElementById("toast").append(box);
  setTimeout(() => box.remove(), 5000);
}

export class ApiError extends Error {}

/** Call the server with this browser's key; an `error` answer becomes an ApiError. */
export async function api(path, { method = "GET", body, query } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const options = { method, headers: { Authorization: `Bearer ${session.key}` } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify({ key: session.key, ...body });
  }
  const response = await fetch(url, options);
  let data;
  try {
    data = await response.json();
  } catch {
    throw new ApiError(`${response.status} ${response.statusText}`);
  }
  if (data && !Array.isArray(data) && (data.status === "error" || data.status === "failed") && !data.id) {
    const message = typeof data.message === "string" ? data.message : JSON.stringify(data.messege || data);
    throw new ApiError(message);
  }
  return data;
}

export function fmtTime(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toLocaleString();
}

export function fmtEta(eta) {
  if (eta === null || eta === undefined) return "";
  return eta < 60 ? `${Math.ceil(eta)} s` : `${Math.ceil(eta / 60)} min`;
}

// ---- live job events --------------------------------------------------------------------------

const listeners = new Set();
const lastEvent = new Map(); // job id -> the newest event data seen
let source = null;
let pollTimer = null;
let failures = 0;

/** fn(name, data) for every job event of this key (the admin: of every key). */
export function onJobEvent(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export function latestEvent(jobId) {
  return lastEvent.get(jobId);
}

function emit(name, data) {
  lastEvent.set(data.id, { name, ...data });
  for (const fn of listeners) fn(name, data);
}

function setStreamState(text, cls) {
  const pill = document.getElementById("stream-state");
  pill.textContent = text;
  pill.className = `pill ${cls}`;
}

function connectEvents() {
  if (source) source.close();
  clearInterval(pollTimer);
  const url = `/api/v1/jobs/events?key=${encodeURIComponent(session.key)}`;
  source = new EventSource(url);
  for (const name of ["queued", "started", "step", "done", "failed"]) {
    source.addEventListener(name, (event) => emit(name, JSON.parse(event.data)));
  }
  source.onopen = () => {
    failures = 0;
    setStreamState("live", "live");
    clearInterval(pollTimer);
  };
  source.onerror = () => {
    failures += 1;
    setStreamState("polling", "off");
    if (failures >= 2) {
      // A proxy that does not pass the stream: poll the jobs this page is waiting for instead.
      source.close();
      startPolling();
    }
  };
}

/** The fallback: the key's active jobs, and any job a page follows, read every 1.5 s. */
export const followed = new Set();
function startPolling() {
  clearInterval(pollTimer);
  pollTimer = setInterval(async () => {
    try {
      const ids = new Set(followed);
      const active = await api("/api/v1/jobs", { query: { status: "active", limit: 50 } });
      for (const job of active.jobs) ids.add(job.id);
      for (const id of ids) {
        const { job } = await api(`/api/v1/jobs/${id}`);
        const previous = lastEvent.get(id);
        const name = { queued: "queued", processing: job.step ? "step" : "started", success: "done", failed: "failed" }[job.status];
        if (!previous || previous.name !== name || previous.step !== job.step) emit(name, job);
        if (name === "done" || name === "failed") followed.delete(id);
      }
    } catch (error) {
      setStreamState("offline", "off");
    }
  }, 1500);
}

// ---- sign-in and routing ----------------------------------------------------------------------

const PAGES = {
  playground: renderPlayground,
  jobs: renderJobs,
  queue: renderQueue,
  admin: renderAdmin,
};

async function signIn(key) {
  session.key = key;
  const me = await api("/api/v1/me");
  session.me = me;
  localStorage.setItem(KEY_STORAGE, key);
  return me;
}

function signOut() {
  localStorage.removeItem(KEY_STORAGE);
  session.key = "";
  session.me = null;
  if (source) source.close();
  clearInterval(pollTimer);
  showSignIn();
}

function showSignIn(message = "") {
  document.getElementById("sign-in").hidden = false;
  document.getElementById("page").replaceChildren();
  document.getElementById("sign-out").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("stream-state").textContent = "";
  document.getElementById("sign-in-error").textContent = message;
  for (const link of document.querySelectorAll(".admin-only")) link.hidden = true;
  document.getElementById("sign-in-key").focus();
}

let currentCleanup = null;
export async function route() {
  if (!session.me) return;
  const [name, ...rest] = (location.hash.replace(/^#\/?/, "") || "playground").split("/");
  const page = PAGES[name] ? name : "playground";
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    link.classList.toggle("current", link.dataset.page === page);
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (currentCleanup) currentCleanup();
  currentCleanup = null;
  const container = document.getElementById("page");
  container.replaceChildren();
  if ((page === "queue" || page === "admin") && !session.me.is_admin) {
    container.append(el("p", { class: "error" }, "This page needs the admin key."));
    return;
  }
  try {
    currentCleanup = (await PAGES[page](container, rest)) || null;
  } catch (error) {
    container.append(el("p", { class: "error", role: "alert" }, `Could not load the page: ${error.message}`));
  }
}

async function start() {
  document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = document.getElementById("sign-in-key").value.trim();
    try {
      await signIn(key);
      document.getElementById("sign-in-key").value = "";
      signedIn();
    } catch (error) {
      showSignIn(error.message === "Invalid Api Key" ? "That key is not valid here." : error.message);
    }
  });
  document.getElementById("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  if (session.key) {
    try {
      await signIn(session.key);
      return signedIn();
    } catch {
      localStorage.removeItem(KEY_STORAGE);
    }
  }
  showSignIn();
}

function signedIn() {
  document.getElementById("sign-in").hidden = true;
  document.getElementById("sign-out").hidden = false;
  const who = session.me.is_admin ? "admin key" : `key${session.me.plan ? ` (${session.me.plan})` : ""}`;
  document.getElementById("who").textContent = `Signed in: ${who}`;
  for (const link of document.querySelectorAll(".admin-only")) link.hidden = !session.me.is_admin;
  connectEvents();
  route();
}

start();
