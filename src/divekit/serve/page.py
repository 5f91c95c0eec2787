"""The page ``divekit serve`` shows at ``GET /``: one self-contained HTML file (no script or
style from elsewhere, so it works offline) that posts to ``/predict`` and draws the reply:
the top-k bars of a classifier, a detector's boxes over the image, a segmentation's colour
overlay, a text head's labels, or a translation."""

from __future__ import annotations

import html
import json
from typing import Any

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>divekit: __TITLE__</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem;
        color: #222; }
 h1 { font-size: 1.3rem; margin-bottom: .2rem; } .sub { color: #666; margin-top: 0; }
 #drop { border: 2px dashed #999; border-radius: 8px; padding: 2rem; text-align: center;
         cursor: pointer; } #drop.over { background: #eef; }
 textarea { width: 100%; font: inherit; } button { font: inherit; padding: .3rem 1rem; }
 .bar { background: #4a7; height: 1rem; } td { padding: .15rem .5rem; }
 #error { color: #b00; } #stage { position: relative; display: inline-block; margin-top: 1rem; }
 #stage img, #stage canvas { max-width: 100%; display: block; }
 #stage .layer { position: absolute; left: 0; top: 0; width: 100%; height: 100%; opacity: .5; }
</style></head>
<body>
<h1>__TITLE__</h1>
<p class="sub">__SUBTITLE__</p>
<div id="image-input" hidden>
  <div id="drop">Drop an image here, or click to choose one
    <input id="file" type="file" accept="image/*" hidden></div>
</div>
<div id="text-input" hidden>
  <textarea id="text" rows="3" placeholder="__PLACEHOLDER__"></textarea>
  <button id="send">Predict</button>
</div>
<p id="error" role="alert"></p>
<div id="stage"></div>
<div id="result" aria-live="polite"></div>
<script>
const INFO = __INFO__;
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");

async function post(body, headers) {
  $("error").textContent = ""; $("result").innerHTML = "…";
  const r = await fetch("predict", {method: "POST", body: body, headers: headers || {}});
  const reply = await r.json();
  if (!r.ok) { $("error").textContent = reply.error; $("result").innerHTML = ""; return null; }
  return reply.predictions;
}

function bars(rows) {
  return "<table>" + rows.map(([name, p]) =>
    `<tr><td class="cls">${esc(name)}</td><td>${(100 * p).toFixed(1)}%</td>` +
    `<td style="width:12rem"><div class="bar" style="width:${100 * p}%"></div></td></tr>`
  ).join("") + "</table>";
}

function showImage(file, p) {
  const url = URL.createObjectURL(file);
  const stage = $("stage");
  stage.innerHTML = `<img id="picture" alt="${esc(file.name)}" src="${url}">`;
  let out = "";
  if (p.predictions) {
    out = `<p>top-1: <strong id="top1">${esc(p.predictions[0]["class"])}</strong></p>` +
      bars(p.predictions.map((x) => [x["class"], x.probability]));
  }
  if (p.detections) {
    const img = $("picture");
    img.onload = () => {
      const c = document.createElement("canvas");
      c.className = "layer"; c.style.opacity = 1;
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext("2d");
      g.lineWidth = Math.max(2, c.width / 200); g.font = `${Math.max(12, c.width / 40)}px sans-serif`;
      for (const d of p.detections) {
        const [x1, y1, x2, y2] = d.box;
        g.strokeStyle = g.fillStyle = "#e33";
        g.strokeRect(x1, y1, x2 - x1, y2 - y1);
        g.fillText(`${d["class"]} ${d.score.toFixed(2)}`, x1 + 2, Math.max(12, y1 - 3));
      }
      stage.appendChild(c);
    };
    out = `<p>${p.detections.length} object(s)</p>` + "<table>" + p.detections.map((d) =>
      `<tr><td>${esc(d["class"])}</td><td>${d.score.toFixed(2)}</td>` +
      `<td>${d.box.map((v) => v.toFixed(0)).join(", ")}</td></tr>`).join("") + "</table>";
  }
  if (p.overlay_png) {
    stage.innerHTML += `<img class="layer" alt="classes" src="data:image/png;base64,${p.overlay_png}">`;
    out = bars(Object.entries(p.fractions || {}).sort((a, b) => b[1] - a[1]));
  }
  $("result").innerHTML = out;
}

function heat(a) {  // rows: output tokens, columns: source tokens; darker = more attention
  const head = "<tr><td></td>" + a.source_tokens.map((t) => `<th>${esc(t)}</th>`).join("") + "</tr>";
  const rows = a.weights.map((row, i) => `<tr><th>${esc(a.output_tokens[i])}</th>` +
    row.map((w) => `<td title="${w.toFixed(3)}" style="background:rgba(40,90,200,${w})">` +
                   "&nbsp;&nbsp;</td>").join("") + "</tr>").join("");
  return `<p>attention</p><table id="attention">${head}${rows}</table>`;
}

function showText(p) {
  $("stage").innerHTML = "";
  let out = "";
  if (p.translation !== undefined) {
    out = `<p>translation: <strong id="top1">${esc(p.translation)}</strong></p>`;
    if (p.unknown && p.unknown.length) out += `<p>unknown words: ${esc(p.unknown.join(", "))}</p>`;
    if (p.attention) out += heat(p.attention);
  } else if (p.top) {
    out = `<p>label: <strong id="top1">${esc(p.label)}</strong></p>` + bars(p.top);
  } else if (p.tags) {
    out = "<p>" + p.words.map((w, i) => `${esc(w)}<sub>${esc(p.tags[i])}</sub>`).join(" ") + "</p>";
  } else {
    out = `<pre>${esc(JSON.stringify(p, null, 1))}</pre>`;
  }
  if (p.truncated) {
    out += `<p>cut to ${p.truncated.max_len} tokens (it had ${p.truncated.tokens})</p>`;
  }
  $("result").innerHTML = out;
}

if (INFO.input === "image") {
  $("image-input").hidden = false;
  const drop = $("drop"), input = $("file");
  const send = async (file) => {
    const form = new FormData(); form.append("file", file);
    const preds = await post(form);
    if (preds) showImage(file, preds[0]);
  };
  drop.onclick = () => input.click();
  input.onchange = () => input.files.length && send(input.files[0]);
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over");
                         if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); };
} else {
  $("text-input").hidden = false;
  $("send").onclick = async () => {
    const t = $("text").value;
    const pair = t.split("|||");
    const body = (INFO.head === "pair" && pair.length === 2)
      ? {pairs: [[pair[0], pair[1]]]} : {text: t};
    if (INFO.task === "translate") body.attention = true;
    const preds = await post(JSON.stringify(body), {"content-type": "application/json"});
    if (preds) showText(preds[0]);
  };
}
</script>
</body></html>
"""


def page_html(info: dict[str, Any]) -> str:
    """The page for a served run; ``info`` is what ``GET /info`` returns (the page reads its
    input kind, head and classes from it)."""
    title = f"{info.get('model') or info['task']} ({info['task']})"
    metrics = info.get("metrics") or {}
    shown = [f"{k} {v:.3g}" for k, v in metrics.items()
             if isinstance(v, float) and k.startswith("val_")][:3]
    subtitle = f"run {info['run']}" + (f" · {', '.join(shown)}" if shown else "")
    placeholder = ("premise ||| hypothesis" if info.get("head") == "pair"
                   else "type a sentence")
    # JSON inside <script>: '<' escaped so no value can close the script element
    data = json.dumps(info).replace("<", "\\u003c")
    return (_PAGE.replace("__TITLE__", html.escape(title))
            .replace("__SUBTITLE__", html.escape(subtitle))
            .replace("__PLACEHOLDER__", html.escape(placeholder))
            .replace("__INFO__", data))
