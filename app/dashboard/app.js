// tuneforge dashboard: plain JS over the same /v1 API the SDKs use. No build step, no CDN.
"use strict";

const KEY_STORAGE = "tuneforge.apiKey";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const view = document.getElementById("view");
let stopCurrent = () => {};  // closes the stream/poller of the page being left
let routeId = 0;  // a page whose routeId is stale (the user moved on) must not touch the view

function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }
function authHeaders() { return apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {}; }

async function api(path, options = {}) {
  const response = await fetch(`/v1${path}`, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((body.error && body.error.message) || `${response.status} ${response.statusText}`);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  return node;
}

function when(seconds) { return seconds ? new Date(seconds * 1000).toLocaleString() : "–"; }
function statusBadge(status) { return el("span", { class: `status ${status}`, "data-status": status }, status); }
function progressBar(progress) {
  const step = (progress && progress.step) || 0, total = progress && progress.total_steps;
  const pct = total ? Math.min(100, (100 * step) / total) : 0;
  const bar = el("span", { class: "bar" }, el("span", { style: `width:${pct.toFixed(1)}%` }));
  return el("span", {}, bar, `${step}/${total || "?"}`);
}
function showError(error) { view.prepend(el("div", { class: "error-box" }, String(error.message || error))); }

// --- jobs list -----------------------------------------------------------------------------------------
async function jobsPage(mine) {
  view.replaceChildren(el("h1", {}, "Fine-tuning jobs"), el("p", { class: "muted" }, "Loading…"));
  const render = async () => {
    const page = await api("/fine_tuning/jobs?limit=50");
    if (mine !== routeId) return;
    const rows = page.data.map((job) => el("tr", { "data-job": job.id },
      el("td", {}, el("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)), el("td", {}, statusBadge(job.status)),
      el("td", {}, job.model), el("td", {}, progressBar(job.progress)), el("td", {}, job.fine_tuned_model || "–"),
      el("td", {}, when(job.created_at))));
    const table = el("table", { id: "jobs" }, el("tr", {}, ["Job", "Status", "Model", "Progress", "Fine-tuned model",
      "Created"].map((h) => el("th", {}, h))), rows);
    view.replaceChildren(el("h1", {}, "Fine-tuning jobs"), page.data.length ? table
      : el("p", { class: "muted" }, "No jobs yet. ", el("a", { href: "#/new" }, "Start one.")));
  };
  await render().catch(showError);
  if (mine !== routeId) return;
  const timer = setInterval(() => render().catch(() => {}), 5000);
  stopCurrent = () => clearInterval(timer);
}

// --- charts (inline SVG) -------------------------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function drawChart(container, series) {
  // series: [{name, cls, points: [[step, value], ...]}]
  const W = 560, H = 240, L = 48, R = 12, T = 10, B = 26;
  const all = series.flatMap((s) => s.points);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  if (all.length) {
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x0 === x1) x1 = x0 + 1;
    if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
    const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4;
      root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: py(y), y2: py(y) }));
      const label = svg("text", { class: "tick", x: L - 4, y: py(y) + 3, "text-anchor": "end" });
      label.textContent = y.toPrecision(3);
      root.append(label);
    }
    root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    for (const [x, anchor] of [[x0, "start"], [x1, "end"]]) {
      const label = svg("text", { class: "tick", x: px(x), y: H - 8, "text-anchor": anchor });
      label.textContent = `step ${Math.round(x)}`;
      root.append(label);
    }
    for (const s of series) {
      if (!s.points.length) continue;
      const path = s.points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ");
      root.append(svg("polyline", { class: `series-${s.cls}`, points: path, fill: "none", "stroke-width": 2 }));
      for (const p of s.points) {
        root.append(svg("circle", { class: `point series-${s.cls}`, cx: px(p[0]), cy: py(p[1]), r: 2.5,
          "data-series": s.name, "data-step": p[0] }));
      }
    }
  }
  const legend = el("div", { class: "legend" }, series.map((s) => el("span", { class: `series-${s.cls}` },
    `● ${s.name} (${s.points.length})`)));
  container.querySelector("svg")?.remove();
  container.querySelector(".legend")?.remove();
  container.append(root, legend);
}

// --- SSE over fetch (EventSource cannot send the Authorization header) ---------------------------------
async function* sseFrames(response) {
  // The frames of a text/event-stream body: {id, event, data} with the fields the frame has; comments skipped.
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const frame = {};
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const i = line.indexOf(":");
        frame[line.slice(0, i)] = line.slice(i + 1).replace(/^ /, "");
      }
      if (frame.data) yield frame;
    }
  }
}

async function followEvents(jobId, onFrame, signal) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const headers = { ...authHeaders(), ...(lastId ? { "Last-Event-ID": lastId } : {}) };
      const response = await fetch(`/v1/fine_tuning/jobs/${jobId}/events/stream`, { headers, signal });
      if (!response.ok) throw new Error(`stream answered ${response.status}`);
      let terminal = false;
      for await (const frame of sseFrames(response)) {
        if (frame.id) lastId = frame.id;
        const data = JSON.parse(frame.data);
        if (frame.event === "status" && TERMINAL.includes(data.status)) terminal = true;
        onFrame(frame.event, data);
      }
      if (terminal) return;
    } catch (error) {
      if (signal.aborted) return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1500));  // reconnect and resume after lastId
  }
}

// --- job page ------------------------------------------------------------------------------------------
async function jobPage(jobId, mine) {
  const job = await api(`/fine_tuning/jobs/${jobId}`);
  if (mine !== routeId) return;
  const controller = new AbortController();
  stopCurrent = () => controller.abort();
  const status = el("span", { id: "job-status" }, statusBadge(job.status));
  const progress = el("span", { id: "job-progress" }, progressBar(job.progress));
  const lossChart = el("div", { class: "chart", id: "loss-chart" }, el("h3", {}, "Loss"));
  // A DPO job's quality is how often it ranks the preferred answer first, and by what reward margin.
  const dpo = (job.method && job.method.type) === "dpo";
  const accuracy = dpo ? "preference_accuracy" : "mean_token_accuracy";
  const accChart = el("div", { class: "chart", id: "accuracy-chart" },
    el("h3", {}, dpo ? "Preference accuracy" : "Mean token accuracy"));
  const marginChart = el("div", { class: "chart", id: "margin-chart" }, el("h3", {}, "Reward margin"));
  const events = el("div", { class: "events", id: "events" });
  const checkpoints = el("tbody", { id: "checkpoints" });
  const artifacts = el("tbody", { id: "artifacts" });
  const detail = el("p", { class: "muted", id: "job-detail" });
  const tryIt = el("div", { id: "try-it" });
  const evaluation = el("div", { id: "evaluation" });
  const offerTry = (state) => {  // a succeeded job's model can be tried here
    if (state.status === "succeeded" && state.fine_tuned_model && !tryIt.firstChild) {
      tryIt.replaceChildren(tryPanel({ ...job, ...state }, controller.signal));
    }
  };
  view.replaceChildren(
    el("h1", {}, el("span", { class: "mono" }, job.id), " ", status),
    el("p", {}, `${job.model} · created ${when(job.created_at)} · `, progress), detail,
    el("div", { class: "charts" }, lossChart, accChart, ...(dpo ? [marginChart] : [])), evaluation, tryIt,
    el("h2", {}, "Events"), events,
    el("h2", {}, "Checkpoints"), el("table", {}, el("tr", {}, ["Step", "Checkpoint", "Train loss", "Valid loss",
      "Created"].map((h) => el("th", {}, h))), checkpoints),
    el("h2", {}, "Artifacts"), el("table", {}, el("tr", {}, ["Name", "Kind", "Bytes", "sha256", ""].map((h) =>
      el("th", {}, h))), artifacts));

  const points = { train_loss: [], valid_loss: [], [`train_${accuracy}`]: [], [`valid_${accuracy}`]: [],
    ...(dpo ? { train_rewards_margin: [], valid_rewards_margin: [] } : {}) };
  const redraw = () => {
    drawChart(lossChart, [{ name: "train", cls: "train", points: points.train_loss },
      { name: "validation", cls: "valid", points: points.valid_loss }]);
    drawChart(accChart, [{ name: "train", cls: "train", points: points[`train_${accuracy}`] },
      { name: "validation", cls: "valid", points: points[`valid_${accuracy}`] }]);
    if (dpo) {
      drawChart(marginChart, [{ name: "train", cls: "train", points: points.train_rewards_margin },
        { name: "validation", cls: "valid", points: points.valid_rewards_margin }]);
    }
  };
  const loadTables = async () => {
    const [ckpts, arts] = await Promise.all([api(`/fine_tuning/jobs/${jobId}/checkpoints?limit=100`),
      api(`/fine_tuning/jobs/${jobId}/artifacts`)]);
    checkpoints.replaceChildren(...ckpts.data.map((c) => el("tr", {}, el("td", {}, c.step_number),
      el("td", { class: "mono" }, c.fine_tuned_model_checkpoint), el("td", {}, fmt(c.metrics.train_loss)),
      el("td", {}, fmt(c.metrics.valid_loss)), el("td", {}, when(c.created_at)))));
    if (arts.data.some((a) => a.name === "eval_samples") && !evaluation.firstChild) {
      const current = await api(`/fine_tuning/jobs/${jobId}`);
      if (current.evaluation) evaluation.replaceChildren(await evaluationPanel(jobId, current.evaluation));
    }
    artifacts.replaceChildren(...arts.data.map((a) => el("tr", {}, el("td", {}, a.name), el("td", {}, a.kind),
      el("td", {}, a.bytes), el("td", { class: "mono" }, a.sha256.slice(0, 16) + "…"),
      el("td", {}, downloadLink(`/v1/fine_tuning/jobs/${jobId}/artifacts/${a.name}`, `${jobId}-${a.name}`)))));
  };
  redraw();
  offerTry(job);
  await loadTables().catch(showError);

  let pending = null;
  const onFrame = (kind, data) => {
    if (kind === "status") {
      status.replaceChildren(statusBadge(data.status));
      progress.replaceChildren(progressBar(data.progress));
      detail.textContent = data.error ? data.error.message : (data.fine_tuned_model || "");
      if (TERMINAL.includes(data.status)) loadTables().catch(showError);
      offerTry(data);
      return;
    }
    events.prepend(el("div", { class: data.level }, `${when(data.created_at)} — ${data.message}`));
    if (data.type === "metrics" && data.data) {
      for (const key of Object.keys(points)) {
        if (typeof data.data[key] === "number") points[key].push([data.data.step, data.data[key]]);
      }
      if (!pending) pending = setTimeout(() => { pending = null; redraw(); }, 100);  // one redraw per burst
    } else if (data.message.startsWith("Checkpoint saved")) {
      loadTables().catch(() => {});
    }
  };
  followEvents(jobId, onFrame, controller.signal);
}

// --- try it: chat with the fine-tuned model, beside its base ---------------------------------------------
async function streamChat(model, body, onDelta, signal) {
  // POST /v1/chat/completions with stream: true; resolves with the finish reason, rejects on any error
  // (an error event midway, or a stream that ends without [DONE]).
  const response = await fetch("/v1/chat/completions", { method: "POST", signal,
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, model, stream: true }) });
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    throw new Error((error.error && error.error.message) || `${response.status} ${response.statusText}`);
  }
  let finish = null;
  for await (const frame of sseFrames(response)) {
    if (frame.data === "[DONE]") return finish;
    const chunk = JSON.parse(frame.data);
    if (chunk.error) throw new Error(chunk.error.message);
    for (const choice of chunk.choices || []) {
      if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  throw new Error("the answer was cut off");
}

function tryPanel(job, signal) {
  const system = el("input", { id: "try-system", placeholder: "System message (optional)" });
  const prompt = el("textarea", { id: "try-prompt", rows: "3", placeholder: "Ask the fine-tuned model…" });
  const maxTokens = el("input", { id: "try-max-tokens", type: "number", min: "1", value: "64" });
  const temperature = el("input", { id: "try-temperature", type: "number", min: "0", max: "2", step: "0.1",
    value: "0" });
  const compare = el("input", { id: "try-compare", type: "checkbox", checked: "" });
  const answer = (id, title) => el("div", { class: "answer" }, el("h3", {}, title),
    el("pre", { id, "data-state": "idle" }));
  const tuned = answer("try-tuned", job.fine_tuned_model), base = answer("try-base", `${job.model} (base)`);
  const ask = async (model, box, body) => {
    const out = box.querySelector("pre");
    out.textContent = "";
    out.dataset.state = "streaming";
    try {
      const finish = await streamChat(model, body, (text) => { out.textContent += text; }, signal);
      out.dataset.state = "done";
      out.dataset.finish = finish || "";
      if (finish === "length") box.append(el("p", { class: "muted try-note" }, "stopped at max tokens"));
    } catch (error) {
      out.dataset.state = "error";
      out.textContent += `\n[${error.message}]`;
    }
  };
  const send = el("button", { id: "try-send", type: "submit" }, "Send");
  const form = el("form", { class: "card try", id: "try-form", onsubmit: async (event) => {
    event.preventDefault();
    for (const note of view.querySelectorAll(".try-note")) note.remove();
    const messages = [...(system.value ? [{ role: "system", content: system.value }] : []),
      { role: "user", content: prompt.value }];
    const body = { messages, max_tokens: Number(maxTokens.value) || 64, temperature: Number(temperature.value) || 0 };
    send.disabled = true;
    base.hidden = !compare.checked;
    await Promise.all([ask(job.fine_tuned_model, tuned, body), ...(compare.checked ? [ask(job.model, base, body)] : [])]);
    send.disabled = false;
  } }, el("label", { for: "try-system" }, "System"), system, el("label", { for: "try-prompt" }, "Message"), prompt,
  el("label", { for: "try-max-tokens" }, "Max tokens"), maxTokens,
  el("label", { for: "try-temperature" }, "Temperature"), temperature,
  el("label", { for: "try-compare" }, "Compare with the base"), compare, el("span"), send);
  return el("div", {}, el("h2", {}, "Try it"), form, el("div", { class: "answers" }, tuned, base));
}

// --- the answer report: base and tuned answers side by side ------------------------------------------------
async function evaluationPanel(jobId, headline) {
  const response = await fetch(`/v1/fine_tuning/jobs/${jobId}/artifacts/eval_samples`, { headers: authHeaders() });
  if (!response.ok) throw new Error(`eval_samples: ${response.status}`);
  const samples = (await response.text()).split("\n").filter((line) => line).map((line) => JSON.parse(line));
  const lastUser = (prompt) => typeof prompt === "string" ? prompt
    : (prompt.filter((m) => m.role === "user").pop() || { content: "" }).content;
  const pct = (value) => `${(100 * value).toFixed(0)}%`;
  const summary = el("table", { id: "eval-summary" }, el("tr", {}, ["", "Exact match", "Token F1", "ROUGE-L",
    "Mean answer tokens", "Hit max tokens"].map((h) => el("th", {}, h))),
  ...["base", "tuned"].map((who) => el("tr", { "data-model": who }, el("td", {}, who),
    el("td", {}, pct(headline[who].exact_match)), el("td", {}, headline[who].f1.toFixed(3)),
    el("td", {}, headline[who].rouge_l.toFixed(3)), el("td", {}, headline[who].mean_answer_tokens.toFixed(1)),
    el("td", {}, pct(headline[who].hit_max_tokens)))));
  const rows = samples.map((s) => {
    const worse = s.tuned.scores.rouge_l < s.base.scores.rouge_l;
    return el("tr", { "data-worse": String(worse), class: worse ? "worse" : "" }, el("td", {}, s.index),
      el("td", {}, lastUser(s.prompt)), el("td", {}, s.reference), el("td", {}, s.base.answer),
      el("td", {}, s.tuned.answer), el("td", {}, s.base.scores.rouge_l.toFixed(2)),
      el("td", {}, s.tuned.scores.rouge_l.toFixed(2)));
  });
  const filter = el("input", { id: "eval-worse", type: "checkbox", onchange: () => {
    for (const row of rows) row.hidden = filter.checked && row.dataset.worse !== "true";
  } });
  return el("div", {}, el("h2", {}, `Answers: base vs tuned (${headline.examples} validation examples, greedy)`),
    summary, el("p", {}, el("label", {}, filter, ` only where tuned is worse than base (${headline.tuned_worse_than_base})`)),
    el("table", { id: "eval-samples" }, el("tr", {}, ["#", "Prompt", "Reference", "Base", "Tuned", "Base ROUGE-L",
      "Tuned ROUGE-L"].map((h) => el("th", {}, h))), rows));
}

function fmt(value) { return typeof value === "number" ? value.toFixed(4) : "–"; }

function downloadLink(url, filename) {
  // A plain link cannot carry the API key: with a key, fetch the bytes and hand them to the browser.
  return el("a", { href: url, download: filename, onclick: async (event) => {
    if (!apiKey()) return;
    event.preventDefault();
    const response = await fetch(url, { headers: authHeaders() });
    if (!response.ok) { showError(new Error(`download failed: ${response.status}`)); return; }
    const link = el("a", { href: URL.createObjectURL(await response.blob()), download: filename });
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } }, "download");
}

async function uploadDataset(file) {
  const data = new FormData();
  data.append("purpose", "fine-tune");
  data.append("file", file);
  const row = await api("/files", { method: "POST", body: data });
  if (row.status === "error") throw new Error(`${file.name} failed validation: ${row.status_details}`);
  return row;
}

// --- new job -------------------------------------------------------------------------------------------
async function newJobPage(mine) {
  const models = await api("/models").catch(() => ({ data: [] }));
  if (mine !== routeId) return;
  const select = el("select", { name: "model", id: "model" },
    models.data.filter((m) => !m.fine_tuning_job).map((m) => el("option", { value: m.id }, m.id)));
  const form = el("form", { class: "card", id: "new-job" },
    el("label", { for: "file" }, "Training data (JSONL)"), el("input", { type: "file", id: "file", name: "file",
      accept: ".jsonl,.json,application/jsonl", required: "" }),
    el("label", { for: "validation" }, "Validation data (optional)"), el("input", { type: "file", id: "validation",
      name: "validation", accept: ".jsonl,.json,application/jsonl" }),
    el("label", { for: "model" }, "Base model"), select,
    el("label", { for: "n_epochs" }, "Epochs"), el("input", { id: "n_epochs", name: "n_epochs", placeholder: "auto" }),
    el("label", { for: "batch_size" }, "Batch size"), el("input", { id: "batch_size", name: "batch_size",
      placeholder: "auto" }),
    el("label", { for: "learning_rate" }, "Learning rate"), el("input", { id: "learning_rate", name: "learning_rate",
      placeholder: "default for the adapter" }),
    el("label", { for: "eval_steps" }, "Evaluate every N steps"), el("input", { id: "eval_steps", name: "eval_steps",
      placeholder: "needs validation data" }),
    el("label", { for: "suffix" }, "Suffix"), el("input", { id: "suffix", name: "suffix", placeholder: "optional" }),
    el("span"), el("button", { type: "submit" }, "Upload and start"));
  const message = el("p", { class: "muted", id: "new-job-status" });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      message.textContent = "Uploading…";
      const file = await uploadDataset(form.file.files[0]);
      const validation = form.validation.files.length ? await uploadDataset(form.validation.files[0]) : null;
      const hyper = {};
      for (const name of ["n_epochs", "batch_size", "eval_steps"]) {
        if (form[name].value) hyper[name] = parseInt(form[name].value, 10);
      }
      if (form.learning_rate.value) hyper.learning_rate = parseFloat(form.learning_rate.value);
      const body = { model: select.value, training_file: file.id };
      if (validation) body.validation_file = validation.id;
      if (form.suffix.value) body.suffix = form.suffix.value;
      if (Object.keys(hyper).length) body.method = { type: "supervised", supervised: { hyperparameters: hyper } };
      message.textContent = "Creating the job…";
      const job = await api("/fine_tuning/jobs", { method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify(body) });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      message.textContent = "";
      showError(error);
    }
  });
  view.replaceChildren(el("h1", {}, "Start a fine-tuning job"), form, message);
}

// --- routing -------------------------------------------------------------------------------------------
// A job id from the address, which goes into API paths: only the shape job ids have (never "../webhooks").
function jobIdOf(text) {
  const id = decodeURIComponent(text);
  if (!/^ftjob-[A-Za-z0-9]+$/.test(id)) throw new Error(`No such job: ${id}`);
  return id;
}

async function route() {
  stopCurrent();
  stopCurrent = () => {};
  const mine = ++routeId;
  const hash = location.hash || "#/";
  try {
    if (hash.startsWith("#/jobs/")) await jobPage(jobIdOf(hash.slice(7)), mine);
    else if (hash === "#/new") await newJobPage(mine);
    else await jobsPage(mine);
  } catch (error) {
    if (mine !== routeId) return;
    view.replaceChildren();
    showError(error);
  }
}

document.getElementById("api-key").value = apiKey();
document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORAGE, document.getElementById("api-key").value.trim());
  route();
});
window.addEventListener("hashchange", route);
route();
