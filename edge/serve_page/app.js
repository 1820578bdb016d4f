// edge-serve's clinic page: send each scan to POST /api/classify and show the record it answers with.
// Plain JavaScript, no library and nothing from the internet: the device serves every byte of this page.
// Server text (file names, errors) is only ever set as textContent, never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "edge-serve-token";
  const TOP_K = 3;
  const MAX_RETRIES = 10;
  // The model's labels in the words a clinic uses; a label not listed here is shown as it is.
  const WORDS = {glioma: "Glioma", meningioma: "Meningioma", pituitary: "Pituitary tumour", notumor: "No tumour"};
  // Statuses other than "ok" (docs/RECORDS.md): never a verdict, always said in plain words. The record's own
  // `message` is the sentence to show; these are for a record without one.
  const NO_VERDICT = {
    refer: "Not like the brain MRI this model was trained on: referred, no verdict",
    refused: "This file cannot be a brain MRI slice: refused, no verdict",
  };
  const NEXT_STEP = {
    refer: "A clinician must read this scan; the model gives no answer for it.",
    refused: "Check that this is the right file, a brain MRI slice, and try again; the model gives no answer for it.",
  };

  const $ = (id) => document.getElementById(id);
  const results = $("results");
  const status = $("status");
  const tokenForm = $("token-form");
  let maxUpload = Infinity;
  let waiting = [];        // [file, card] pairs not yet sent
  let busy = false;
  let pausedForToken = false;

  function token() {
    return localStorage.getItem(TOKEN_KEY) || "";
  }

  function authHeaders() {
    const t = token();
    return t ? {Authorization: "Bearer " + t} : {};
  }

  function words(label) {
    return Object.prototype.hasOwnProperty.call(WORDS, label) ? WORDS[label] : String(label);
  }

  function percent(p) {
    return (100 * Number(p)).toFixed(1) + "%";
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function takeTokenFromLink() {
    // A link or QR code may carry the token after '#', which browsers never send to a server.
    const match = location.hash.match(/^#token=([^&]+)/);
    if (match) {
      localStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  function askForToken(message) {
    pausedForToken = true;
    tokenForm.hidden = false;
    status.textContent = message;
    $("token").focus();
  }

  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    tokenForm.hidden = true;
    pausedForToken = false;
    status.textContent = "";
    loadModel();
    pump();
  });

  async function loadModel() {
    try {
      const health = await (await fetch("/healthz", {cache: "no-store"})).json();
      maxUpload = health.max_upload_bytes || Infinity;
      $("limit").textContent = "Largest file: " + (maxUpload / 1e6).toFixed(0) + " MB.";
      if (health.token_required && !token()) {
        askForToken("Enter the access code to classify scans.");
        return;
      }
      const response = await fetch("/api/models", {headers: authHeaders(), cache: "no-store"});
      if (response.status === 401) {
        askForToken("The access code is missing or wrong; enter it again.");
        return;
      }
      const models = await response.json();
      const loaded = models.loaded;
      $("model").textContent = "Model " + loaded.name + ": " + loaded.labels.map(words).join(", ") +
        (loaded.has_heatmap ? "; shows where it looked." : ".");
      $("gate").textContent = loaded.gate
        ? "Scans unlike the ones it was trained on are referred, with no verdict."
        : "This model cannot tell other images from brain MRI: it only turns away files that cannot be a " +
          "brain slice (blank, colour, no head); anything else gets a verdict.";
    } catch (err) {
      $("model").textContent = "The device does not answer; is it on, and is this its address?";
    }
  }

  function addFiles(files) {
    for (const file of files) {
      const card = el("li", "card pending");
      card.appendChild(el("p", "file", file.name || "scan"));
      card.appendChild(el("p", "verdict", "Waiting\u2026"));
      results.insertBefore(card, results.firstChild);
      if (file.size > maxUpload) {
        renderError(card, (file.name || "scan") + ": the file is over the " + (maxUpload / 1e6).toFixed(0) +
          " MB limit of this device");
        continue;
      }
      waiting.push([file, card]);
    }
    pump();
  }

  async function pump() {
    // One scan at a time from this page: the device has a few workers, shared by every phone in the clinic.
    if (busy) return;
    busy = true;
    try {
      while (waiting.length && !pausedForToken) {
        const [file, card] = waiting[0];
        card.querySelector(".verdict").textContent = "Classifying\u2026";
        const done = await send(file, card);
        if (done) waiting.shift();
      }
    } finally {
      busy = false;
    }
  }

  function sleep(seconds) {
    return new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  }

  async function send(file, card) {
    for (let attempt = 0; attempt <= MAX_RETRIES; attempt++) {
      const form = new FormData();
      form.append("file", file, file.name || "scan");
      let response;
      try {
        response = await fetch("/api/classify?top_k=" + TOP_K, {method: "POST", headers: authHeaders(), body: form});
      } catch (err) {
        renderError(card, (file.name || "scan") + ": the device did not answer (" + err.message + ")");
        return true;
      }
      if (response.status === 401) {
        card.querySelector(".verdict").textContent = "Waiting for the access code\u2026";
        askForToken("The access code is missing or wrong; enter it to go on.");
        return false;
      }
      if (response.status === 503 && attempt < MAX_RETRIES) {
        card.querySelector(".verdict").textContent = "The device is busy; trying again\u2026";
        await sleep(Number(response.headers.get("Retry-After")) || 1);
        continue;
      }
      let record;
      try {
        record = await response.json();
      } catch (err) {
        renderError(card, (file.name || "scan") + ": the device answered " + response.status + " without a result");
        return true;
      }
      render(card, record);
      return true;
    }
    return true;
  }

  function render(card, record) {
    card.replaceChildren(el("p", "file", String(record.source || "scan")));
    if (record.status === "error") {
      renderError(card, record.error || "unknown error");
    } else if (record.status === "ok") {
      renderVerdict(card, record);
    } else {
      renderNoVerdict(card, record);
    }
  }

  function renderError(card, message) {
    card.className = "card error";
    const verdict = card.querySelector(".verdict") || card.appendChild(el("p", "verdict"));
    verdict.textContent = "Could not classify this file";
    card.appendChild(el("p", "message", message));
  }

  function renderNoVerdict(card, record) {
    // refer, refused or any later status: no label, no probabilities, whatever else the record holds.
    card.className = "card no-verdict";
    card.appendChild(el("p", "verdict", "No verdict"));
    card.appendChild(el("p", "message", String(record.message || NO_VERDICT[record.status] ||
      "The model gives no answer for this file (" + record.status + ").")));
    card.appendChild(el("p", "message", NEXT_STEP[record.status] || "A clinician must read this scan."));
    if (typeof record.ood_score === "number") {
      card.appendChild(el("p", "meta", "Unlike the training scans by " + record.ood_score.toFixed(2) +
        " (above 1: referred)"));
    }
    if (record.overlay_png) card.appendChild(figure(record.overlay_png, "The scan as the model received it", null));
    card.appendChild(meta(record));
  }

  function figure(src, alt, caption) {
    const node = el("figure");
    const img = el("img", "overlay");
    img.alt = alt;
    img.src = src;
    node.appendChild(img);
    if (caption) node.appendChild(el("figcaption", "hint", caption));
    return node;
  }

  function renderVerdict(card, record) {
    card.className = "card ok";
    const verdict = el("p", "verdict", words(record.label) + " ");
    verdict.appendChild(el("span", "confidence", percent(record.confidence)));
    card.appendChild(verdict);
    const list = el("ul", "topk");
    list.setAttribute("aria-label", "Most likely answers");
    for (const entry of record.top_k || []) {
      const row = el("li");
      row.appendChild(el("span", "topk-label", words(entry.label)));
      const bar = el("span", "bar");
      const fill = el("span", "fill");
      fill.style.width = Math.max(0, Math.min(100, 100 * entry.probability)).toFixed(1) + "%";
      bar.appendChild(fill);
      row.appendChild(bar);
      row.appendChild(el("span", "topk-value", percent(entry.probability)));
      list.appendChild(row);
    }
    card.appendChild(list);
    if (record.overlay_png) {
      card.appendChild(figure(record.overlay_png, "The scan with the model's heatmap: where it looked for its answer",
        record.has_heatmap ? "Where the model looked: the colour scale under the picture runs from low to high " +
          "evidence. It shows what the model used, not where a lesion is." : null));
    }
    card.appendChild(meta(record));
  }

  function meta(record) {
    const parts = [];
    if (record.model && record.model.name) parts.push("model " + record.model.name);
    if (record.timings_ms && typeof record.timings_ms.total === "number") {
      parts.push(record.timings_ms.total.toFixed(0) + " ms");
    }
    return el("p", "meta", parts.join(" \u00b7 "));
  }

  // Inputs, and drag and drop: a drop anywhere on the page is taken, so a near miss never opens the file.
  for (const id of ["camera", "files"]) {
    $(id).addEventListener("change", (event) => {
      addFiles(Array.from(event.target.files));
      event.target.value = "";
    });
  }
  const drop = $("drop");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.target === document.documentElement || event.target === drop) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles(Array.from(event.dataTransfer.files));
  });

  takeTokenFromLink();
  loadModel();
})();
