// cxr-triage page: upload an X-ray (or click a bundled example), show the server's Prediction:
// uncertain and rejected answers first as such, with the reasons in words; bars only for answers with a label.
"use strict";

const CLASSES = ["covid", "lung_opacity", "normal", "viral_pneumonia"];
// Page-only strings. Class names, decision names and "or" come from the server (#strings, runtime/i18n.py),
// advice and reasons with every prediction, so the page says what the CLI and the API say.
const TEXT = {
  en: {
    tagline: "Chest X-ray triage: COVID-19, lung opacity, viral pneumonia or normal",
    dropTitle: "Choose or drop a chest X-ray",
    dropHint: "PNG, JPEG, BMP, TIFF, WebP or DICOM · frontal view",
    samplesTitle: "Or try an example",
    showHeatmap: "Show heatmap",
    finding: "Most likely",
    verdict: "Result",
    why: "Why",
    probabilities: "Probabilities",
    nextSteps: "What to do next",
    lungAttention: "{p} of the heatmap lies inside the lung fields (outlined in cyan)",
    analysing: "Analysing…",
    confidence: "confidence",
    apiDocs: "API documentation",
    failed: "The request failed; check that the service is running.",
    tokenLabel: "This service needs an access token (made with cxr-triage token new):",
    tokenSubmit: "Continue",
    tokenRefused: "That token was refused; enter it again.",
  },
  ko: {
    tagline: "흉부 X선 분류: 코로나19, 폐 음영, 바이러스성 폐렴, 정상",
    dropTitle: "흉부 X선 영상을 선택하거나 끌어다 놓으세요",
    dropHint: "PNG, JPEG, BMP, TIFF, WebP 또는 DICOM · 정면 영상",
    samplesTitle: "또는 예시 영상을 눌러 보세요",
    showHeatmap: "히트맵 보기",
    finding: "가장 가능성 높은 결과",
    verdict: "결과",
    why: "사유",
    probabilities: "확률",
    nextSteps: "다음 단계",
    lungAttention: "히트맵의 {p}가 폐 영역(청록색 윤곽) 안에 있습니다",
    analysing: "분석 중…",
    confidence: "신뢰도",
    apiDocs: "API 문서",
    failed: "요청에 실패했습니다. 서비스가 실행 중인지 확인하세요.",
    tokenLabel: "이 서비스는 접근 토큰이 필요합니다 (cxr-triage token new로 발급):",
    tokenSubmit: "계속",
    tokenRefused: "토큰이 거부되었습니다. 다시 입력하세요.",
  },
};
const SHARED = JSON.parse(document.getElementById("strings").textContent);

const state = { lang: "en", file: null, result: null, samples: [] };
const $ = (id) => document.getElementById(id);
const pct = (p) => `${(100 * p).toFixed(1)}%`;

function t(key) {
  return key in TEXT[state.lang] ? TEXT[state.lang][key] : SHARED[state.lang][key];
}

function setStatus(text, busy = false) {
  $("status").textContent = text;
  $("status").classList.toggle("busy", busy);
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function callPredict(file, params) {
  const body = new FormData();
  body.append("file", file, file.name);
  const query = new URLSearchParams({ lang: state.lang, ...params });
  const response = await window.cxrFetch(`/api/v1/predict?${query}`, { method: "POST", body });
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

async function analyse(file) {
  state.file = file;
  showError("");
  setStatus(t("analysing"), true);
  try {
    state.result = await callPredict(file, { heatmap: "true", image: "true" });
    render();
    setStatus("");
    document.querySelector(".upload").classList.add("compact");
    if (window.matchMedia("(max-width: 720px)").matches) $("result").scrollIntoView({ block: "start" });
  } catch (err) {
    state.result = null;
    $("result").hidden = true;
    setStatus("");
    showError(err.message || t("failed"));
  }
}

function ranked(r) {
  return CLASSES.map((c) => [c, r[`p_${c}`]]).sort((a, b) => b[1] - a[1]);
}

function renderBars(r) {
  const list = $("prob-bars");
  list.replaceChildren();
  for (const c of CLASSES) {
    const p = r[`p_${c}`];
    const li = document.createElement("li");
    li.dataset.testid = `prob-${c}`;
    li.classList.toggle("top", c === r.label);
    const name = document.createElement("span");
    name.textContent = t("names")[c];
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = pct(p);
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "pct";
    value.textContent = pct(p);
    li.append(name, bar, value);
    list.append(li);
  }
}

function renderCandidates(r) {
  const box = $("candidates");
  box.hidden = r.decision !== "uncertain";
  if (box.hidden) return;
  const boxes = box.querySelectorAll(".candidate");
  ranked(r).slice(0, 2).forEach(([c, p], i) => {
    boxes[i].dataset.label = c;
    boxes[i].querySelector(".cand-name").textContent = t("names")[c];
    boxes[i].querySelector(".cand-pct").textContent = pct(p);
  });
  box.querySelector(".cand-or").textContent = t("or");
}

function renderReasons(r) {
  const list = $("reasons");
  list.replaceChildren(
    ...r.reasons.map((reason) => {
      const li = document.createElement("li");
      li.dataset.code = reason.code;
      li.textContent = reason.text;
      return li;
    }),
  );
  $("reasons-box").hidden = r.reasons.length === 0;
}

function render() {
  const r = state.result;
  if (!r) return;
  const card = $("result");
  card.className = `card result decision-${r.decision}`;
  const accepted = r.decision === "accept";
  $("result-kicker").dataset.i18n = accepted ? "finding" : "verdict";
  $("result-kicker").textContent = t($("result-kicker").dataset.i18n);
  // only an accepted answer is headlined by its class; the others say first what they are
  $("result-label").textContent = accepted ? t("names")[r.label] : t("decisions")[r.decision];
  $("result-label").dataset.label = r.label || "";
  $("result-decision").textContent = t("decisions")[r.decision];
  $("result-decision").dataset.decision = r.decision;
  $("result-decision").hidden = !accepted;
  $("result-confidence").textContent = accepted ? `${t("confidence")} ${pct(r.confidence)}` : "";
  $("result-confidence").hidden = !accepted;
  renderCandidates(r);
  renderReasons(r);
  const bars = r.label !== null && r.p_covid !== null;  // no bars for rejected or unreadable inputs
  $("probabilities").hidden = !bars;
  if (bars) renderBars(r);
  $("advice-text").textContent = r.advice;
  const lungs = $("lung-attention");
  lungs.hidden = r.lung_attention === null || r.lung_attention === undefined || !r.heatmap;
  lungs.textContent = lungs.hidden ? "" : t("lungAttention").replace("{p}", pct(r.lung_attention));
  $("file-name").textContent = r.path;
  $("input-img").src = `data:image/png;base64,${r.image}`;
  const heat = $("heatmap-img");
  if (r.heatmap) heat.src = `data:image/png;base64,${r.heatmap}`;
  else heat.removeAttribute("src");
  heat.hidden = !r.heatmap;
  $("heatmap-toggle").disabled = !r.heatmap;
  applyHeatmapToggle();
  card.hidden = false;
}

function applyHeatmapToggle() {
  document.querySelector(".stack").classList.toggle("heat-off", !$("heatmap-toggle").checked);
}

function renderSamples() {
  const list = $("sample-list");
  list.replaceChildren(
    ...state.samples.map((s) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "sample";
      button.dataset.testid = "sample";
      button.dataset.name = s.name;
      button.title = s.name;
      const img = document.createElement("img");
      img.src = s.url;
      img.alt = s.name;
      img.loading = "lazy";
      const caption = document.createElement("span");
      caption.textContent = t("names")[s.label];
      button.append(img, caption);
      button.addEventListener("click", () => analyseSample(s));
      li.append(button);
      return li;
    }),
  );
  $("samples").hidden = state.samples.length === 0;
}

async function analyseSample(sample) {
  try {
    const response = await fetch(sample.url);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const blob = await response.blob();
    await analyse(new File([blob], sample.name, { type: blob.type || "image/jpeg" }));
  } catch (err) {
    showError(err.message || t("failed"));
  }
}

function applyLanguage() {
  document.documentElement.lang = state.lang;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const b of document.querySelectorAll(".lang button")) {
    b.setAttribute("aria-pressed", String(b.dataset.lang === state.lang));
  }
  const notice = $("notice");
  notice.textContent = notice.dataset[`notice${state.lang === "ko" ? "Ko" : "En"}`];
  if (!$("status").classList.contains("busy")) setStatus("");
  renderSamples();
}

async function switchLanguage(lang) {
  if (lang === state.lang) return;
  state.lang = lang;
  applyLanguage();
  if (!state.result || !state.file) return;
  render();
  try {  // advice and reasons come from the server: ask again in the new language (no images needed)
    const again = await callPredict(state.file, { heatmap: "false", image: "false" });
    if (state.lang === lang && state.result) {
      Object.assign(state.result, { advice: again.advice, reasons: again.reasons, lang: again.lang });
      render();
    }
  } catch (err) {
    showError(err.message || t("failed"));
  }
}

async function loadModelInfo() {
  try {
    const health = await (await window.cxrFetch("/api/v1/health")).json();
    const m = health.model;
    $("model-info").textContent = `${m.name} ${m.version} · sha256 ${m.sha256.slice(0, 12)}`;
  } catch {
    $("model-info").textContent = "";
  }
}

async function loadSamples() {
  try {
    const response = await window.cxrFetch("/api/v1/samples");
    state.samples = response.ok ? await response.json() : [];
  } catch {
    state.samples = [];
  }
  renderSamples();
}

function setup() {
  $("file-input").addEventListener("change", (e) => {
    if (e.target.files.length) analyse(e.target.files[0]);
  });
  const zone = $("drop-zone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]);
  });
  $("heatmap-toggle").addEventListener("change", applyHeatmapToggle);
  for (const b of document.querySelectorAll(".lang button")) {
    b.addEventListener("click", () => switchLanguage(b.dataset.lang));
  }
  applyLanguage();
  loadModelInfo();
  loadSamples();
}

document.addEventListener("DOMContentLoaded", setup);
