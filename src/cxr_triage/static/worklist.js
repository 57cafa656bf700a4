// cxr-triage page: the DICOM node's worklist (GET /api/v1/worklist), most urgent first. No patient names.
"use strict";

(() => {
  const WL = {
    en: {
      title: "Worklist from the DICOM node: most urgent first",
      heads: ["Urgency", "Accession", "Finding", "Decision", "Received"],
      urgency: { urgent: "Urgent", high: "High", review: "Review", routine: "Routine" },
      names: { covid: "COVID-19", lung_opacity: "Lung Opacity", normal: "Normal", viral_pneumonia: "Viral Pneumonia" },
      decisions: { accept: "Confident", uncertain: "Uncertain", rejected: "Not a chest X-ray", error: "Unreadable" },
    },
    ko: {
      title: "DICOM 노드 판독 목록: 긴급한 순서",
      heads: ["긴급도", "접수 번호", "소견", "판정", "수신"],
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
      );
      return tr;
    });
    document.getElementById("worklist-rows").replaceChildren(...rows);
  }

  async function load() {
    try {
      const response = await fetch("/api/v1/worklist");
      if (!response.ok) return;
      entries = await response.json();
      render();
    } catch {
      // the worklist is optional: the page works without it
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    load();
    setInterval(load, 15000);
    new MutationObserver(render).observe(document.documentElement, { attributes: true, attributeFilter: ["lang"] });
  });
})();
