// The captioning page: send an image to /caption, show the caption, the beam
// alternatives and a per-word attention heat map, and send corrections to /feedback.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = { file: null, result: null, word: -1 };

  const statusBox = $("status");
  function setStatus(text, kind) {
    statusBox.textContent = text;
    statusBox.className = "status" + (kind ? " " + kind : "");
  }

  function headers() {
    const key = $("api-key").value || sessionStorage.getItem("captioning-api-key") || "";
    return key ? { "X-API-Key": key } : {};
  }

  async function post(path, form) {
    const response = await fetch(path, { method: "POST", body: form, headers: headers() });
    let body = null;
    try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
    if (response.status === 401) {
      $("api-key-row").hidden = false;
      $("api-key").closest("details").open = true;
    }
    if (!response.ok) throw new Error((body && body.error) || ("HTTP " + response.status));
    return body;
  }

  // ------------------------------------------------------------ input
  async function useFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus("That file is not an image (" + file.type + ").", "error");
      return;
    }
    state.file = file;
    const preview = $("preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    await caption();
  }

  async function caption() {
    const form = new FormData();
    form.append("image", state.file, state.file.name || "image");
    form.append("beam_size", $("beam-size").value);
    form.append("max_length", $("max-length").value);
    form.append("return_attention", "true");
    setStatus("Captioning…");
    try {
      const result = await post("/caption", form);
      if ($("api-key").value) sessionStorage.setItem("captioning-api-key", $("api-key").value);
      show(result);
      setStatus("Done.", "ok");
    } catch (error) {
      setStatus("Could not caption the image: " + error.message, "error");
    }
  }

  const dropZone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => useFile(event.target.files[0]));
  dropZone.addEventListener("click", (event) => {
    if (event.target === dropZone || event.target.tagName === "P") $("file-input").click();
  });
  dropZone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file-input").click(); }
  });
  ["dragenter", "dragover"].forEach((name) => dropZone.addEventListener(name, (event) => {
    event.preventDefault(); dropZone.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((name) => dropZone.addEventListener(name, () => dropZone.classList.remove("dragging")));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    useFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const items = Array.from((event.clipboardData || {}).items || []);
    const item = items.find((entry) => entry.type.startsWith("image/"));
    if (item) useFile(item.getAsFile());
  });

  // ------------------------------------------------------------ result
  function show(result) {
    state.result = result;
    $("result").hidden = false;
    $("caption").textContent = result.caption;
    $("correction").value = result.caption;
    $("model-version").textContent = "Model version: " + result.model_version;
    $("latency").textContent = "Answered in " + Math.round(result.latency_ms) + " ms.";

    const list = $("alternatives");
    list.replaceChildren();
    for (const alt of result.alternatives || []) {
      const li = document.createElement("li");
      li.append(alt.caption);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = "log p = " + Number(alt.log_prob).toFixed(2);
      li.append(score);
      list.append(li);
    }

    const words = $("words");
    words.replaceChildren();
    const attention = result.attention;
    const tokens = attention ? attention.words : [];
    tokens.forEach((word, index) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = word;
      button.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-label", "Show attention for “" + word + "”");
      button.addEventListener("mouseenter", () => selectWord(index));
      button.addEventListener("focus", () => selectWord(index));
      button.addEventListener("click", () => selectWord(index));
      words.append(button);
    });
    $("prev-word").disabled = $("next-word").disabled = tokens.length === 0;
    state.word = -1;
    const preview = $("preview");
    const start = () => selectWord(tokens.length ? 0 : -1);
    if (preview.complete && preview.naturalWidth) start(); else preview.onload = start;
  }

  function flatten(map) {
    return Array.isArray(map[0]) ? map.flat() : map;
  }

  function selectWord(index) {
    const attention = state.result && state.result.attention;
    const buttons = Array.from($("words").children);
    buttons.forEach((button, i) => button.setAttribute("aria-pressed", String(i === index)));
    state.word = index;
    drawHeatmap(attention && index >= 0 ? flatten(attention.maps[index]) : null,
                attention ? attention.grid : 0);
  }

  function step(delta) {
    const count = $("words").children.length;
    if (!count) return;
    const next = ((state.word < 0 ? 0 : state.word + delta) + count) % count;
    selectWord(next);
    $("words").children[next].focus();
  }
  $("prev-word").addEventListener("click", () => step(-1));
  $("next-word").addEventListener("click", () => step(1));
  $("words").addEventListener("keydown", (event) => {
    if (event.key === "ArrowRight") { event.preventDefault(); step(1); }
    if (event.key === "ArrowLeft") { event.preventDefault(); step(-1); }
  });

  function drawHeatmap(values, grid) {
    const canvas = $("heatmap");
    const preview = $("preview");
    canvas.width = preview.clientWidth || preview.naturalWidth;
    canvas.height = preview.clientHeight || preview.naturalHeight;
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.word = String(state.word);
    if (!values || !grid) return;
    // grid is [rows, columns] (or one number for a square grid).
    const [rows, columns] = Array.isArray(grid) ? grid : [grid, grid];
    if (rows * columns !== values.length) return;
    // Paint the rows x columns weights on a tiny canvas, then scale it up smoothly.
    const small = document.createElement("canvas");
    small.width = columns;
    small.height = rows;
    const smallContext = small.getContext("2d");
    const image = smallContext.createImageData(columns, rows);
    const max = Math.max(...values) || 1;
    values.forEach((value, i) => {
      const level = Math.max(0, value) / max;
      image.data[i * 4] = 255;
      image.data[i * 4 + 1] = Math.round(200 * (1 - level));
      image.data[i * 4 + 2] = 0;
      image.data[i * 4 + 3] = Math.round(165 * level);
    });
    smallContext.putImageData(image, 0, 0);
    context.imageSmoothingEnabled = true;
    context.drawImage(small, 0, 0, canvas.width, canvas.height);
    canvas.dataset.drawn = "true";
  }
  window.addEventListener("resize", () => { if (state.result) selectWord(state.word); });

  // ------------------------------------------------------------ model version
  async function showModel() {
    try {
      const response = await fetch("/model", { headers: headers() });
      if (response.status === 401) { $("api-key-row").hidden = false; return; }
      if (response.ok) $("model-version").textContent = "Model version: " + (await response.json()).model_version;
    } catch (error) { /* the caption request reports problems */ }
  }
  showModel();

  // ------------------------------------------------------------ feedback
  $("feedback-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("correction").value.trim();
    if (!text || !state.file) { setStatus("Write the better caption first.", "error"); return; }
    const form = new FormData();
    form.append("image", state.file, state.file.name || "image");
    form.append("caption", text);
    form.append("predicted_caption", state.result ? state.result.caption : "");
    form.append("model_version", state.result ? state.result.model_version : "");
    $("send-feedback").disabled = true;
    try {
      await post("/feedback", form);
      setStatus("Thank you: your correction was saved.", "ok");
    } catch (error) {
      setStatus("Could not save the correction: " + error.message, "error");
    } finally {
      $("send-feedback").disabled = false;
    }
  });
})();
