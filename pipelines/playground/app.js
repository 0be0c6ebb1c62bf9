// Playground for the sampling endpoint: plain browser JavaScript, no dependencies, no build step.
// It reads v1/model, fills the form (from the URL's query parameters too), streams v1/generate/stream (SSE)
// and shows the previews, then the final images. <body data-state> tells tests and scripts where it stands.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const CONFIG = JSON.parse($("playground-config").textContent);
  const NUMBER_FIELDS = ["steps", "guidance_scale", "num_samples", "seed"];
  const URL_FIELDS = ["class_labels", "sampler", ...NUMBER_FIELDS];
  let info = null;
  let running = false;

  class FieldError extends Error {
    constructor(field, message) {
      super(`${field}: ${message}`);
    }
  }

  function setState(state, message = "") {
    document.body.dataset.state = state;
    const status = $("status");
    status.textContent = message;
    status.className = state === "error" ? "status error" : "status";
  }

  const fail = (message) => setState("error", message);

  // FastAPI's 422 body is {"detail": [{"loc": ["body", "steps"], "msg": "..."}]}; 503 is {"detail": "..."}.
  function describeError(status, body) {
    const detail = body && body.detail;
    if (Array.isArray(detail)) {
      const lines = detail.map((e) => {
        const loc = (e.loc || []).filter((part) => part !== "body").join(".") || "body";
        return `${loc}: ${e.msg}`;
      });
      return `HTTP ${status}: ${lines.join("\n")}`;
    }
    return `HTTP ${status}: ${typeof detail === "string" ? detail : "request failed"}`;
  }

  function className(label) {
    const names = info.class_names;
    return names && names[label] !== undefined ? names[label] : `class ${label}`;
  }

  function option(value, text) {
    const el = document.createElement("option");
    el.value = value;
    el.textContent = text;
    return el;
  }

  // ------------------------------------------------------------------------------------------ model facts
  function showModel() {
    const facts = [
      ["name", info.name ?? "(not registered)"], ["version", info.version ?? "-"], ["uri", info.uri],
      ["image", `${info.image_size}\u00d7${info.image_size}\u00d7${info.channels}`],
      ["classes", info.num_classes || "unconditional"], ["diffusion steps", info.num_timesteps],
      ["training steps", info.training_steps ?? "-"], ["device", info.device],
    ];
    $("model-facts").replaceChildren(...facts.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = String(v);
      return [dt, dd];
    }));
    const ui = CONFIG.mlflow_ui_url;
    if (ui && info.name && info.version) {
      const link = $("mlflow-link");
      link.href = `${ui}/#/models/${encodeURIComponent(info.name)}/versions/${encodeURIComponent(info.version)}`;
      link.textContent = `${info.name} v${info.version} in MLflow`;
      link.hidden = false;
    }
    if (ui && info.run_id) {
      const link = $("run-link");
      link.href = `${ui}/#/runs/${encodeURIComponent(info.run_id)}`;
      link.hidden = false;
    }
  }

  function fillForm() {
    const classes = $("class_labels");
    classes.replaceChildren(option("", info.num_classes ? "all classes, in turn" : "(unconditional)"));
    for (let k = 0; k < info.num_classes; k++) classes.append(option(String(k), className(k)));
    classes.disabled = info.num_classes === 0;
    $("sampler").replaceChildren(...info.samplers.map((s) => option(s, s)));
    $("sampler").value = info.samplers.includes("ddim") ? "ddim" : info.samplers[0];
    $("steps").max = info.num_timesteps;
    $("steps").value = Math.min(50, info.num_timesteps);
    $("guidance_scale").value = 1;
    $("guidance_scale").disabled = info.num_classes === 0;
    $("num_samples").max = info.max_samples_per_request;
    $("num_samples").value = Math.min(8, info.max_samples_per_request);
    $("seed").value = "";
  }

  // URL query parameters prefill the form; a value the form cannot hold is an error, never silently dropped.
  function applyQuery(params) {
    for (const field of NUMBER_FIELDS) {
      if (!params.has(field)) continue;
      const raw = params.get(field).trim();
      if (raw !== "" && !Number.isFinite(Number(raw))) throw new FieldError(field, `not a number: "${raw}"`);
      $(field).value = raw;
    }
    if (params.has("sampler")) {
      const sampler = params.get("sampler");
      const select = $("sampler");
      if (![...select.options].some((o) => o.value === sampler)) select.append(option(sampler, sampler));
      select.value = sampler;
    }
    if (params.has("class_labels")) {
      const raw = params.get("class_labels").trim();
      const labels = raw === "" ? [] : raw.split(",").map((s) => s.trim());
      if (labels.some((s) => !/^-?\d+$/.test(s))) throw new FieldError("class_labels", `not integers: "${raw}"`);
      const value = labels.join(",");
      const select = $("class_labels");
      if (![...select.options].some((o) => o.value === value)) {
        select.append(option(value, labels.map((s) => className(Number(s))).join(", ")));
      }
      select.value = value;
      select.disabled = false;
    }
  }

  // The request body: JSON numbers (the API does not coerce "5" to 5); empty fields take the server default.
  function requestBody() {
    const body = { sampler: $("sampler").value };
    const labels = $("class_labels");
    if (!labels.disabled && labels.value !== "") body.class_labels = labels.value.split(",").map(Number);
    for (const field of NUMBER_FIELDS) {
      const input = $(field);
      const raw = input.value.trim();
      if (input.disabled || raw === "") continue;
      const value = Number(raw);
      if (!Number.isFinite(value)) throw new FieldError(field, `not a number: "${raw}"`);
      body[field] = value;
    }
    return body;
  }

  function queryOf(body) {
    const params = new URLSearchParams();
    for (const field of URL_FIELDS) {
      if (body[field] === undefined) continue;
      params.set(field, Array.isArray(body[field]) ? body[field].join(",") : String(body[field]));
    }
    return params;
  }

  // ------------------------------------------------------------------------------------------ streaming
  // Server-sent events from a fetch body: blocks separated by a blank line, "event:" and "data:" lines.
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  function showImages(target, images, labels) {
    target.replaceChildren(...images.map((b64, i) => {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${b64}`;
      img.alt = labels ? `sample ${i + 1}: ${labels[i]}` : `sample ${i + 1}`;
      img.title = img.alt;
      return img;
    }));
  }

  function labelsOf(body, n) {
    if (!info.num_classes) return null;
    const given = body.class_labels;
    return Array.from({ length: n }, (_, i) => className(
      given ? given[given.length === 1 ? 0 : i] : i % info.num_classes));
  }

  function showFinal(final, body) {
    showImages($("result"), final.images, labelsOf(body, final.images.length));
    const model = final.model || {};
    const version = model.name ? `${model.name} v${model.version}` : model.uri;
    const ms = final.timings_ms && final.timings_ms.total;
    $("result-meta").textContent = [
      `seed ${final.seed}`, `${final.sampler}, ${final.steps} steps`, `model ${version}`,
      ms !== undefined ? `${Math.round(ms)} ms` : null,
    ].filter(Boolean).join(" \u00b7 ");
    // The address now reproduces this exact result (the seed used included).
    history.replaceState(null, "", `?${queryOf({ ...body, seed: final.seed })}`);
  }

  async function generate() {
    if (running || !info) return;
    let body;
    try {
      body = requestBody();
    } catch (e) {
      return fail(e.message);
    }
    running = true;
    $("generate").disabled = true;
    $("preview").replaceChildren();
    $("preview-step").textContent = "";
    $("result").replaceChildren();
    $("result-meta").textContent = "";
    const progress = $("progress");
    progress.value = 0;
    progress.hidden = false;
    setState("running", "sending request\u2026");
    try {
      const response = await fetch("v1/generate/stream", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
      });
      if (!response.ok) {
        const payload = await response.json().catch(() => null);
        throw new Error(describeError(response.status, payload));
      }
      let final = null;
      for await (const { event, data } of sseEvents(response)) {
        if (event === "start") {
          setState("running", `seed ${data.seed}: sampling ${data.total} steps\u2026`);
        } else if (event === "preview") {
          showImages($("preview"), data.images, labelsOf(body, data.images.length));
          progress.value = data.step / data.total;
          $("preview-step").textContent = `(x\u2080 prediction after step ${data.step} of ${data.total})`;
          setState("running", `step ${data.step} of ${data.total}`);
        } else if (event === "final") {
          final = data;
        } else if (event === "error") {
          throw new Error(data.detail || "the server reported an error");
        }
      }
      if (!final) throw new Error("the stream ended without a final result");
      progress.value = 1;
      showFinal(final, body);
      setState("done", `done: ${final.images.length} image(s)`);
    } catch (e) {
      fail(e.message);
    } finally {
      running = false;
      progress.hidden = true;
      $("generate").disabled = false;
    }
  }

  // ------------------------------------------------------------------------------------------ start
  async function start() {
    setState("loading", "loading the model's description\u2026");
    try {
      const response = await fetch("v1/model", { headers: { Accept: "application/json" } });
      const payload = await response.json().catch(() => null);
      if (!response.ok) throw new Error(`v1/model: ${describeError(response.status, payload)}`);
      info = payload;
    } catch (e) {
      return fail(e.message);
    }
    showModel();
    fillForm();
    $("generate").disabled = false;
    const params = new URLSearchParams(location.search);
    try {
      applyQuery(params);
    } catch (e) {
      return fail(e.message);
    }
    setState("idle");
    if (params.get("autorun") === "1") generate();
  }

  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  start();
})();
