// The egaku web page: a thin client of the same OpenAI-compatible API that scripts use.
"use strict";

const $ = (id) => document.getElementById(id);
let options = null;
// Settings a variation or upscale reuses from its image where the request leaves them out (docs/serve.md), and the
// values the last Generate sent: a card's buttons send one only where the user has changed it since.
const IMAGE_SETTINGS = ["steps", "sampler", "guidance_scale", "negative_prompt", "clip_skip", "loras"];
// what to send for one the form has since emptied (no negative prompt, clip skip 1, no LoRA rows, no guidance: the
// chosen model's default), which it otherwise leaves out: left out, the image's own would be reused
const CLEARED = { negative_prompt: "", clip_skip: 1, loras: [],
                  get guidance_scale() { return chosenModel().default_guidance; } };
let generatedWith = {};

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem("egaku-api-key", key);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: headers(init.headers || {}) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = body.error || {};
    throw new Error(`${response.status}: ${err.message || response.statusText}${err.param ? ` (${err.param})` : ""}`);
  }
  return body;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function fill(select, values, chosen) {
  select.replaceChildren(...values.map((v) => new Option(v, v, false, v === chosen)));
}

async function loadOptions() {
  try {
    options = await api("/v1/egaku/options");
  } catch (e) {
    showError(`${e.message}\nIf the server needs a key, enter it above and reload.`);
    return;
  }
  showError("");
  fill($("model"), options.models.map((m) => m.id), options.models[0].id);
  fillSamplers();
  $("n").max = options.max_n;
  $("steps").max = options.max_steps;
  $("steps").value = options.default_steps;  // the server's default, within its limit
  fillLoras();
}

function chosenModel() {
  return options.models.find((m) => m.id === $("model").value) || options.models[0];
}

// Only the samplers the chosen model takes (the server refuses the others); the choice stays where it can.
function fillSamplers() {
  const samplers = chosenModel().samplers;
  const current = $("sampler").value;
  fill($("sampler"), samplers, samplers.includes(current) ? current : options.default_sampler);
}

// Only the LoRAs the chosen model can load (the server refuses the others: another architecture or base model).
function modelLoras() {
  return (options.model_loras || {})[chosenModel().id] || options.loras;
}

function fillLoras() {
  const loras = modelLoras();
  const unusable = Object.keys((options.unusable_loras || {})[chosenModel().id] || {}).length;
  $("lora-none").textContent = unusable ? `none of the server's LoRAs fit this model (${unusable} for others)`
    : "the server has no LoRA folder (egaku serve --lora-dir DIR)";
  $("lora-none").hidden = loras.length > 0;
  $("add-lora").hidden = loras.length === 0;
  document.querySelectorAll(".lora-row select").forEach((select) => {
    if (loras.includes(select.value)) fill(select, loras, select.value);
    else select.closest(".lora-row").remove();
  });
}

function addLoraRow() {
  const row = document.createElement("div");
  row.className = "lora-row";
  const select = document.createElement("select");
  fill(select, modelLoras(), modelLoras()[0]);
  const weight = Object.assign(document.createElement("input"), { type: "number", step: "0.05", value: "0.8" });
  const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "×" });
  remove.onclick = () => row.remove();
  row.append(select, weight, remove);
  $("lora-rows").append(row);
}

function chosenSize() {
  const aspect = $("aspect").value;
  if (aspect === "custom") return $("size").value.trim() || undefined;
  const model = chosenModel();
  const [w, h] = aspect.split(":").map(Number);
  const round = (x) => Math.max(model.multiple, Math.round(x / model.multiple) * model.multiple);
  return `${round(model.native_size * Math.sqrt(w / h))}x${round(model.native_size * Math.sqrt(h / w))}`;
}

function common() {
  const body = { model: $("model").value, steps: Number($("steps").value), response_format: "b64_json",
                 sampler: $("sampler").value };
  // empty: the model's own default guidance (its folder's egaku_defaults.json: 3 for the built-in model; else 7.5)
  if ($("guidance").value !== "") body.guidance_scale = Number($("guidance").value);
  if ($("negative").value.trim()) body.negative_prompt = $("negative").value.trim();
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (Number($("clip-skip").value) > 1) body.clip_skip = Number($("clip-skip").value);
  const loras = [...document.querySelectorAll(".lora-row")].map((row) => ({
    name: row.querySelector("select").value, weight: Number(row.querySelector("input").value) }));
  if (loras.length) body.loras = loras;
  return body;
}

// Runs one API call while polling its job's progress; disables the buttons meanwhile.
async function withProgress(label, call) {
  const job = `page-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
  const bar = $("progress");
  document.querySelectorAll("button").forEach((b) => (b.disabled = true));
  bar.hidden = false; bar.removeAttribute("value");
  $("status").textContent = `${label}…`;
  showError("");
  let finished = false;  // a poll still in flight when the call returns must not overwrite "done"
  const timer = setInterval(async () => {
    try {
      const p = await api(`/v1/egaku/jobs/${job}`);
      if (finished) return;
      if (p.position > 0) $("status").textContent = `${label}: waiting, #${p.position} in the queue`;
      else if (p.total) { bar.max = p.total; bar.value = p.step; $("status").textContent = `${label}: step ${p.step}/${p.total}`; }
    } catch (e) { /* not queued yet */ }
  }, 300);
  try {
    const result = await call({ "X-Egaku-Job": job });
    finished = true;
    $("status").textContent = `${label}: done, ${result.data.length} image${result.data.length > 1 ? "s" : ""}`;
    return result;
  } catch (e) {
    finished = true;
    showError(e.message);
    $("status").textContent = "";
    return null;
  } finally {
    clearInterval(timer);
    bar.hidden = true;
    document.querySelectorAll("button").forEach((b) => (b.disabled = false));
  }
}

function describe(p) {
  const lines = [p.prompt];
  if (p.negative_prompt) lines.push(`Negative prompt: ${p.negative_prompt}`);
  const weight = (w) => (typeof w === "object" ? `${w.text_encoder}:${w.unet}` : w);  // a tag's two, as A1111 writes them
  const pairs = [["Steps", p.steps], ["Sampler", p.sampler_label || p.sampler], ["CFG", p.guidance_scale],
                 ["Seed", p.seed], ["Size", `${p.width}x${p.height}`], ["Strength", p.strength],
                 ["Clip skip", p.clip_skip > 1 ? p.clip_skip : undefined], ["Model", p.model_name], ["LoRAs", (p.loras || []).map(([n, w]) => `${n}:${weight(w)}`).join(" ")],
                 ["Upscaled from", p.upscaled_from]];
  lines.push(pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").map(([k, v]) => `${k}: ${v}`).join(", "));
  return lines.join("\n");
}

function show(result) {
  if (!result) return;
  const cards = result.data.map((item) => {
    const card = $("card").content.firstElementChild.cloneNode(true);
    const src = `data:image/png;base64,${item.b64_json}`;
    const img = card.querySelector("img");
    img.src = src;
    img.alt = item.revised_prompt || "generated image";
    card.querySelector(".params").textContent = describe(item.egaku || {});
    card.querySelector(".download").href = src;
    card.querySelector(".variations").onclick = () => fromImage("variations", item);
    card.querySelector(".upscale").onclick = () => fromImage("upscale", item);
    return card;
  });
  $("gallery").prepend(...cards);
}

async function fromImage(kind, item) {
  const bytes = Uint8Array.from(atob(item.b64_json), (c) => c.charCodeAt(0));
  const form = new FormData();
  form.append("image", new Blob([bytes], { type: "image/png" }), "image.png");
  const body = common();
  delete body.seed;  // variations want new seeds
  for (const key of IMAGE_SETTINGS) {
    if (JSON.stringify(body[key]) === JSON.stringify(generatedWith[key])) delete body[key];  // (loras: a list)
    else if (body[key] === undefined && key in CLEARED) body[key] = CLEARED[key];
  }
  if (kind === "variations") body.n = Number($("n").value);
  for (const [k, v] of Object.entries(body)) form.append(k, typeof v === "object" ? JSON.stringify(v) : String(v));
  const label = kind === "variations" ? "Variations" : "Upscaling";
  show(await withProgress(label, (extra) => api(`/v1/images/${kind === "variations" ? "variations" : "upscale"}`,
                                                { method: "POST", body: form, headers: extra })));
}

$("controls").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!options) await loadOptions();
  if (!options) return;
  const prompt = $("prompt").value;
  if (!prompt.trim()) { showError("type a prompt first"); return; }
  const body = { ...common(), prompt, n: Number($("n").value) };
  generatedWith = Object.fromEntries(IMAGE_SETTINGS.map((key) => [key, body[key]]));
  // "--ar" in the prompt sets the shape itself; the size field would conflict with it
  if (!/(^|\s)--(ar|aspect)\s/.test(prompt)) body.size = chosenSize();
  show(await withProgress("Generating", (extra) => api("/v1/images/generations", {
    method: "POST", body: JSON.stringify(body), headers: { ...extra, "Content-Type": "application/json" } })));
});
$("model").addEventListener("change", () => { fillSamplers(); fillLoras(); });
$("aspect").addEventListener("change", () => ($("size-box").hidden = $("aspect").value !== "custom"));
$("add-lora").addEventListener("click", addLoraRow);
$("api-key").value = localStorage.getItem("egaku-api-key") || "";
loadOptions();
