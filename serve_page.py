"""The page serve.py serves at /: one HTML document with its CSS and JavaScript inline, no external requests.

It posts the photo and labels to /api/segment with "maps": true and draws the overlay itself from winner_png and
cosine_png, so the "unknown below" slider re-thresholds in the browser: the threshold changes only which pixels are
unknown, never a pixel's winning label, so the network need not run again, the slider answers at once, and the model
stays free for other requests. The cosines arrive as 16-bit numbers (to 1/32768), so the page's shares equal the
API's for the same unknown_below up to pixels within 3e-5 of the threshold.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Segment a photo with any labels</title>
<link rel="icon" href="data:,">
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .6em; }
  #controls { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2em; text-align: center; }
  #drop.over { border-color: #2a7; background: #efe; }
  textarea { width: 100%; box-sizing: border-box; font: 14px monospace; }
  .row { margin: .6em 0; display: flex; gap: .8em; align-items: center; flex-wrap: wrap; }
  #status { min-height: 1.4em; color: #555; }
  #status.error { color: #b00; font-weight: bold; }
  #view { display: flex; gap: 1.2em; align-items: flex-start; flex-wrap: wrap; margin-top: 1em; }
  canvas { width: 640px; max-width: 100%; border: 1px solid #ccc; }  /* small working sizes shown larger */
  #legend { border-collapse: collapse; }
  #legend td { padding: 2px 8px; border-bottom: 1px solid #eee; }
  #legend td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #000; vertical-align: middle; }
  small { color: #666; }
</style>
</head>
<body>
<h1>Segment a photo with any labels</h1>
<div id="controls">
  <div id="drop">Drop a photo here, or <input type="file" id="file" accept="image/*">
    <div><small id="filename">no photo yet</small></div></div>
  <div>
    <label for="labels">Labels: comma-separated, or one per line as <code>label: sentence</code></label>
    <textarea id="labels" rows="5" spellcheck="false">sky, road, building, tree, car, person</textarea>
  </div>
</div>
<div class="row">
  <button id="go">Segment</button> <small>(Ctrl+Enter in the labels)</small>
  <label for="thr">unknown below</label>
  <input type="range" id="thr" min="-1" max="1" step="0.01" value="-1">
  <span id="thrv">off</span>
  <small>cosine of a pixel's best label under which it is unknown (black); -1 = off</small>
</div>
<div id="status"></div>
<div id="view"><canvas id="overlay" width="0" height="0"></canvas><table id="legend"></table></div>
<script>
"use strict";
const $ = id => document.getElementById(id);
let photoFile = null, view = null, sequence = 0;

function parseLabels(text) {  // "a, b" and "label: sentence" lines -> {labels, sentences}
  const labels = [], sentences = {};
  for (const line of text.split("\n")) {
    const colon = line.indexOf(":");
    if (colon >= 0) {
      const label = line.slice(0, colon).trim(), sentence = line.slice(colon + 1).trim();
      if (label) { labels.push(label); if (sentence) sentences[label] = sentence; }
    } else {
      for (const label of line.split(",")) if (label.trim()) labels.push(label.trim());
    }
  }
  return {labels, sentences};
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  if (isError) document.body.dataset.state = "error";
}

function fileBase64(file) {
  return new Promise((ok, fail) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => fail(reader.error);
    reader.readAsDataURL(file);
  });
}

async function pixels(source, w, h, exact) {  // an image (Blob) -> RGBA bytes at w x h
  const options = exact ? {colorSpaceConversion: "none", premultiplyAlpha: "none"} : {};
  const bitmap = await createImageBitmap(source, options);
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const g = canvas.getContext("2d", {willReadFrequently: true});
  g.drawImage(bitmap, 0, 0, w, h);
  return g.getImageData(0, 0, w, h).data;
}

function pngBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  return new Blob([bytes], {type: "image/png"});
}

async function segment() {
  if (!photoFile) { status("choose or drop a photo first", true); return; }
  const {labels, sentences} = parseLabels($("labels").value);
  if (!labels.length) { status("type at least one label", true); return; }
  const mine = ++sequence;
  document.body.dataset.state = "busy";
  status(`segmenting ${photoFile.name} into ${labels.length} labels ...`);
  try {
    const body = JSON.stringify({image: await fileBase64(photoFile), labels, sentences, maps: true});
    const response = await fetch("/api/segment", {method: "POST", headers: {"Content-Type": "application/json"}, body});
    const answer = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
    if (mine !== sequence) return;  // a newer request was made meanwhile
    if (!response.ok) { status(`error ${response.status}: ${answer.error}`, true); return; }
    const [w, h] = answer.size;
    view = {answer, w, h, n: answer.labels.length,
            photo: await pixels(photoFile, w, h, false),
            winner: await pixels(pngBlob(answer.winner_png), w, h, true),
            cosine: await pixels(pngBlob(answer.cosine_png), w, h, true),
            rgb: answer.labels.map(l => [1, 3, 5].map(i => parseInt(answer.colours[l].substr(i, 2), 16)))};
    view.rgb.push([0, 0, 0]);  // unknown
    if (mine !== sequence) return;
    render();
    status(`${answer.image_size[0]}x${answer.image_size[1]} photo, seen at ${w}x${h}, ${answer.seconds.toFixed(2)} s`);
  } catch (e) {
    if (mine === sequence) status(`error: ${e.message || e}`, true);
  }
}

function render() {  // the overlay and legend of `view` at the slider's threshold
  const t = +$("thr").value;
  $("thrv").textContent = t <= -1 ? "off" : t.toFixed(2);
  if (!view) return;
  const {w, h, n, photo, winner, cosine, rgb, answer} = view;
  const qt = t <= -1 ? -1 : Math.round((t + 1) / 2 * 65535);  // the API's 16-bit cosine scale
  const canvas = $("overlay");
  canvas.width = w; canvas.height = h;
  const g = canvas.getContext("2d");
  const out = g.createImageData(w, h), d = out.data;
  const counts = new Float64Array(n + 1), sums = new Float64Array(n + 1);
  for (let k = 0; k < d.length; k += 4) {
    let id = winner[k] + 256 * winner[k + 1];
    const q = cosine[k] * 256 + cosine[k + 1];
    if (id >= n || q < qt) id = n;  // a background label's pixel, or under the threshold: unknown
    counts[id] += 1; sums[id] += q / 65535 * 2 - 1;
    const c = rgb[id];
    d[k] = (photo[k] + c[0]) / 2; d[k + 1] = (photo[k + 1] + c[1]) / 2; d[k + 2] = (photo[k + 2] + c[2]) / 2;
    d[k + 3] = 255;
  }
  g.putImageData(out, 0, 0);
  const rows = [["", "label", "share", "mean cosine"]];
  answer.labels.forEach((label, i) => rows.push([answer.colours[label], label, counts[i], sums[i], answer.texts[label]]));
  if (counts[n]) rows.push(["#000000", "unknown", counts[n], null, ""]);
  const table = $("legend");
  table.replaceChildren(...rows.map((r, j) => {
    const tr = document.createElement("tr");
    if (j === 0) { tr.innerHTML = r.map(x => `<th>${x}</th>`).join(""); return tr; }
    const [colour, label, count, sum, text] = r;
    const cells = [document.createElement("td"), document.createElement("td"), document.createElement("td"),
                   document.createElement("td")];
    cells[0].innerHTML = `<span class="swatch" style="background:${colour}"></span>`;
    cells[1].textContent = label; cells[1].title = text ? `embedded: ${text}` : "";
    cells[1].className = "label";
    cells[2].textContent = (100 * count / (w * h)).toFixed(1) + " %"; cells[2].className = "num";
    cells[3].textContent = count && sum !== null ? (sum / count).toFixed(3) : ""; cells[3].className = "num";
    tr.append(...cells);
    return tr;
  }));
  document.body.dataset.state = "done";
}

function choose(file) {
  if (!file) return;
  photoFile = file;
  $("filename").textContent = `${file.name} (${Math.round(file.size / 1024)} kB)`;
  segment();
}

$("file").addEventListener("change", e => choose(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files[0]); });
$("go").addEventListener("click", segment);
$("labels").addEventListener("keydown", e => { if (e.key === "Enter" && e.ctrlKey) segment(); });
$("thr").addEventListener("input", render);
</script>
</body>
</html>
"""
