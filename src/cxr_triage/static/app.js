// cxr-triage page: upload an X-ray, show the server's image + heatmap, probabilities, decision and advice.
"use strict";

const CLASSES = ["covid", "lung_opacity", "normal", "viral_pneumonia"];
const TEXT = {
  en: {
    tagline: "Chest X-ray triage: COVID-19, lung opacity, viral pneumonia or normal",
    dropTitle: "Choose or drop a chest X-ray",
    dropHint: "PNG, JPEG or DICOM · frontal view",
    showHeatmap: "Show heatmap",
    finding: "Most likely",
    verdict: "Result",
    probabilities: "Probabilities",
    nextSteps: "What to do next",
    analysing: "Analysing…",
    noResult: "No result",
    confidence: "confidence",
    failed: "The request failed; check that the service is running.",
    names: { covid: "COVID-19", lung_opacity: "Lung Opacity", normal: "Normal", viral_pneumonia: "Viral Pneumonia" },
    decisions: { accept: "Confident", uncertain: "Uncertain: needs a radiologist", rejected: "Not a chest X-ray",
                 error: "Unreadable" },
  },
  ko: {
    tagline: "흉부 X선 분류: 코로나19, 폐 음영, 바이러스성 폐렴, 정상",
    dropTitle: "흉부 X선 영상을 선택하거나 끌어다 놓으세요",
    dropHint: "PNG, JPEG 또는 DICOM · 정면 영상",
    showHeatmap: "히트맵 보기",
    finding: "가장 가능성 높은 결과",
    verdict: "결과",
    probabilities: "확률",
    nextSteps: "다음 단계",
    analysing: "분석 중…",
    noResult: "결과 없음",
    confidence: "신뢰도",
    failed: "요청에 실패했습니다. 서비스가 실행 중인지 확인하세요.",
    names: { covid: "코로나19", lung_opacity: "폐 음영", normal: "정상", viral_pneumonia: "바이러스성 폐렴" },
    decisions: { accept: "확실", uncertain: "불확실: 전문의 판독 필요", rejected: "흉부 X선 아님", error: "읽을 수 없음" },
  },
};

const state = { lang: "en", file: null, result: null };
const $ = (id) => document.getElementById(id);

function t(key) {
  return TEXT[state.lang][key];
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
  const response = await fetch(`/api/v1/predict?${query}`, { method: "POST", body });
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

function renderBars(r) {
  const list = $("prob-bars");
  list.replaceChildren();
  for (const c of CLASSES) {
    const p = r[`p_${c}`];
    const li = document.createElement("li");
    li.dataset.testid = `prob-${c}`;
    li.classList.toggle("top", c === r.label && r.decision !== "rejected");
    const name = document.createElement("span");
    name.textContent = t("names")[c];
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * p).toFixed(1)}%`;
    li.append(name, bar, pct);
    list.append(li);
  }
}

function render() {
  const r = state.result;
  if (!r) return;
  const card = $("result");
  card.className = `card result decision-${r.decision}`;
  const rejected = r.decision === "rejected";
  $("result-label").textContent = rejected ? t("noResult") : t("names")[r.label];
  $("result-label").dataset.label = rejected ? "" : r.label;
  $("result-decision").textContent = t("decisions")[r.decision];
  $("result-decision").dataset.decision = r.decision;
  $("result-kicker").dataset.i18n = rejected ? "verdict" : "finding";
  $("result-kicker").textContent = t($("result-kicker").dataset.i18n);
  $("result-confidence").textContent = `${t("confidence")} ${(100 * r.confidence).toFixed(1)}%`;
  $("result-confidence").hidden = rejected;
  renderBars(r);
  $("advice-text").textContent = r.advice;
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

function applyLanguage() {
  document.documentElement.lang = state.lang;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const b of document.querySelectorAll(".lang button")) {
    b.setAttribute("aria-pressed", String(b.dataset.lang === state.lang));
  }
  const notice = $("notice");
  notice.textContent = notice.dataset[`notice${state.lang === "ko" ? "Ko" : "En"}`];
  if (!$("status").classList.contains("busy")) setStatus("");
}

async function switchLanguage(lang) {
  if (lang === state.lang) return;
  state.lang = lang;
  applyLanguage();
  if (!state.result || !state.file) return;
  render();
  try {  // the advice comes from the server: ask again in the new language (no images needed)
    const again = await callPredict(state.file, { heatmap: "false", image: "false" });
    if (state.lang === lang) {
      state.result.advice = again.advice;
      $("advice-text").textContent = again.advice;
    }
  } catch (err) {
    showError(err.message || t("failed"));
  }
}

async function loadModelInfo() {
  try {
    const health = await (await fetch("/api/v1/health")).json();
    const m = health.model;
    $("model-info").textContent = `${m.name} ${m.version} · sha256 ${m.sha256.slice(0, 12)}`;
  } catch {
    $("model-info").textContent = "";
  }
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
}

document.addEventListener("DOMContentLoaded", setup);
