// cxr-triage page: the DICOM node's worklist (GET /api/v1/worklist), most urgent first. No patient names.
"use strict";

(() => {
  const WL = {
    en: {
      title: "Worklist from the DICOM node: most urgent first",
      heads: ["Urgency", "Accession", "Finding", "Decision", "Received", "Results to PACS"],
      results: { sent: "Sent", queued: "Queued, retry at", failed: "Failed permanently" },
      urgency: { urgent: "Urgent", high: "High", review: "Review", routine: "Routine" },
      names: { covid: "COVID-19", lung_opacity: "Lung Opacity", normal: "Normal", viral_pneumonia: "Viral Pneumonia" },
      decisions: { accept: "Confident", uncertain: "Uncertain", rejected: "Not a chest X-ray", error: "Unreadable" },
    },
    ko: {
      title: "DICOM 노드 판독 목록: 긴급한 순서",
      heads: ["긴급도", "접수 번호", "소견", "판정", "수신", "PACS 전송"],
      results: { sent: "전송됨", queued: "대기 중, 재시도", failed: "전송 실패(영구)" },
      urgency: { urgent: "긴급", high: "높음", review: "검토", routine: "일반" },
      names: { covid: "코로나19", lung_opacity: "폐 음영", normal: "정상", viral_pneumonia: "바이러스성 폐렴" },
      decisions: { accept: "확실", uncertain: "불확실", rejected: "흉부 X선 아님", error: "읽을 수 없음" },
    },
  };
  let entries = [];

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  // sent / queued (retry at …) / failed permanently (reason)
  function resultsText(e, w) {
    const status = e.results_status || (e.results_sent ? "sent" : "queued");
    if (status === "queued") {
      const at = e.retry_at ? new Date(e.retry_at * 1000).toLocaleTimeString() : "…";
      return `${w.results.queued} ${at}${e.results_reason ? ` (${e.results_reason})` : ""}`;
    }
    if (status === "failed") return `${w.results.failed}${e.results_reason ? ` (${e.results_reason})` : ""}`;
    return w.results.sent;
  }

  function render() {
    const section = document.getElementById("worklist");
    if (!section) return;
    section.hidden = entries.length === 0;
    const w = WL[document.documentElement.lang === "ko" ? "ko" : "en"];
    document.getElementById("worklist-title").textContent = w.title;
    document.querySelectorAll("#worklist th").forEach((th, i) => { th.textContent = w.heads[i]; });
    const rows = entries.map((e) => {
      const tr = document.createElement("tr");
      tr.dataset.urgency = e.urgency_name;
      const finding = e.label && e.decision !== "error" && e.decision !== "rejected"
        ? `${w.names[e.label] || e.label} ${Math.round(100 * e.confidence)}%` : "";
      tr.append(
        cell(w.urgency[e.urgency_name], `wl-badge wl-${e.urgency_name}`),
        cell(e.accession_number || "—"),
        cell(finding),
        cell(w.decisions[e.decision] || e.decision),
        cell(new Date(e.received_at * 1000).toLocaleString()),
        cell(resultsText(e, w), `wl-results wl-results-${e.results_status || "sent"}`),
      );
      return tr;
    });
    document.getElementById("worklist-rows").replaceChildren(...rows);
  }

  let loading = false;

  async function load() {
    if (loading) return;  // e.g. still waiting for the access token
    loading = true;
    try {
      const response = await window.cxrFetch("/api/v1/worklist");
      if (!response.ok) return;
      entries = await response.json();
      render();
    } catch {
      // the worklist is optional: the page works without it
    } finally {
      loading = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    load();
    setInterval(load, 15000);
    new MutationObserver(render).observe(document.documentElement, { attributes: true, attributeFilter: ["lang"] });
  });
})();
