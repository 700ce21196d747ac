// The playground: one static page that calls the public HTTP API (POST /v1/rank) and nothing else.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { blob: null, kind: null, recorder: null, chunks: [] };
const PALETTE = ["#3a6fd8", "#d8613a", "#2f9e6e", "#a14fd0", "#c9a227", "#d03f7a", "#4aa3c7", "#7a7a7a"];

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function kindOf(type) {
  if (type.startsWith("image/")) return "image";
  if (type.startsWith("audio/") || type.startsWith("video/")) return "audio";
  return null;
}

function choose(blob, name) {
  const kind = kindOf(blob.type || "");
  if (!kind) {
    setStatus(`${name}: not an image or a sound (${blob.type || "unknown type"})`, true);
    return;
  }
  state.blob = blob;
  state.kind = kind;
  const url = URL.createObjectURL(blob);
  $("preview").innerHTML = "";
  const element = document.createElement(kind === "image" ? "img" : "audio");
  element.src = url;
  if (kind === "audio") element.controls = true;
  $("preview").appendChild(element);
  $("rank").disabled = false;
  setStatus(`${name}: ${kind}, ${(blob.size / 1024).toFixed(1)} KiB`);
}

function dataUri(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function labels() {
  return $("labels").value.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
}

async function rank() {
  const candidates = labels();
  if (!state.blob || candidates.length === 0) {
    setStatus("choose an input and type at least one label", true);
    return;
  }
  const body = {
    query: { [state.kind]: await dataUri(state.blob) },
    candidates: candidates.map((text) => ({ text })),
  };
  if (state.kind === "audio") {
    body.window_s = Number($("window").value);
    body.hop_s = Number($("hop").value);
  }
  const headers = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  setStatus("ranking ...");
  $("rank").disabled = true;
  try {
    const response = await fetch("../v1/rank", { method: "POST", headers, body: JSON.stringify(body) });
    const answer = await response.json();
    if (!response.ok) {
      const error = answer.error || {};
      setStatus(`${response.status} ${error.type || ""}: ${error.message || response.statusText}`, true);
      return;
    }
    showResults(answer.results, candidates);
    showTimeline(answer.timeline || null, candidates);
    setStatus(`ranked ${candidates.length} labels (${response.headers.get("x-total-time") || "?"} ms)`);
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
  } finally {
    $("rank").disabled = false;
  }
}

function showResults(results, candidates) {
  const list = $("results");
  list.innerHTML = "";
  for (const r of results) {
    const item = document.createElement("li");
    item.dataset.label = candidates[r.index];
    item.dataset.probability = r.probability.toFixed(6);
    item.textContent = `${candidates[r.index]} — ${(100 * r.probability).toFixed(1)} %`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(2, 200 * r.probability)}px`;
    item.appendChild(bar);
    list.appendChild(item);
  }
}

function showTimeline(timeline, candidates) {
  const box = $("timeline-box");
  const list = $("timeline-list");
  list.innerHTML = "";
  if (!timeline || timeline.length === 0) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const canvas = $("timeline");
  const ctx = canvas.getContext("2d");
  const left = 150, top = 10, rowHeight = 30;
  canvas.height = top + candidates.length * rowHeight + 24;
  const end = Math.max(...timeline.map((w) => w.end_s));
  const width = canvas.width - left - 10;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "12px sans-serif";
  candidates.forEach((label, row) => {
    ctx.fillStyle = "#1d2433";
    ctx.fillText(label.slice(0, 22), 4, top + row * rowHeight + rowHeight * 0.65);
  });
  // each window a column; a cell's opacity is the label's probability in that window
  for (const w of timeline) {
    const x = left + (w.start_s / end) * width;
    const w_px = Math.max(1, ((w.end_s - w.start_s) / end) * width);
    for (const r of w.results) {
      ctx.globalAlpha = 0.1 + 0.9 * r.probability;
      ctx.fillStyle = PALETTE[r.index % PALETTE.length];
      ctx.fillRect(x, top + r.index * rowHeight + 2, w_px, rowHeight - 4);
    }
    ctx.globalAlpha = 1;
    const best = w.results[0];
    const item = document.createElement("li");
    item.dataset.start = w.start_s;
    item.dataset.end = w.end_s;
    item.dataset.label = candidates[best.index];
    const span = `${w.start_s.toFixed(1)}–${w.end_s.toFixed(1)} s`;
    item.textContent = `${span}: ${candidates[best.index]} (${(100 * best.probability).toFixed(0)} %)`;
    list.appendChild(item);
  }
  ctx.fillStyle = "#1d2433";
  const axis = top + candidates.length * rowHeight + 14;
  ctx.fillText("0 s", left, axis);
  ctx.fillText(`${end.toFixed(1)} s`, left + width - 40, axis);
}

async function startRecording() {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const recorder = new MediaRecorder(stream);
    state.recorder = recorder;
    state.chunks = [];
    recorder.ondataavailable = (event) => { if (event.data.size > 0) state.chunks.push(event.data); };
    recorder.onstop = () => {
      stream.getTracks().forEach((track) => track.stop());
      const type = recorder.mimeType || "audio/webm";
      choose(new Blob(state.chunks, { type }), `recording (${type})`);
      $("recording-state").textContent = "";
    };
    recorder.start();
    $("record").disabled = true;
    $("stop").disabled = false;
    $("recording-state").textContent = "recording ...";
  } catch (err) {
    setStatus(`microphone: ${err}`, true);
  }
}

function stopRecording() {
  if (state.recorder && state.recorder.state !== "inactive") state.recorder.stop();
  $("record").disabled = false;
  $("stop").disabled = true;
}

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) choose(file, file.name);
});
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) choose(file, file.name);
});
$("record").addEventListener("click", startRecording);
$("stop").addEventListener("click", stopRecording);
$("rank").addEventListener("click", rank);
