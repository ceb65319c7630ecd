// The static dashboard's index: sort, filter, search and paginate window.SPD_INDEX in the page.
(function () {
  "use strict";
  var data = window.SPD_INDEX, rows = data.rows, state = { sort: "density", desc: true, page: 1 }, per = 50;
  function num(id) { var v = document.getElementById(id).value.trim(); return v === "" ? null : Number(v); }
  function fmt(v) { return v === null || v === undefined ? "-" : (Math.abs(v) >= 100 ? v.toFixed(1) : (Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(3) : v.toExponential(1))); }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; }); }
  function filtered() {
    var q = document.getElementById("q").value.toLowerCase().split(/\s+/).filter(Boolean);
    var site = document.getElementById("site").value, dmin = num("dmin"), dmax = num("dmax");
    var score = document.getElementById("score").value, smin = num("smin");
    var out = rows.filter(function (r) {
      if (site && r.site !== site) return false;
      if (dmin !== null && r.density < dmin) return false;
      if (dmax !== null && r.density > dmax) return false;
      if (score && smin !== null && !(r[score] !== null && r[score] >= smin)) return false;
      var text = ((r.label || "") + " " + (r.input_tokens || "") + " " + (r.output_tokens || "")).toLowerCase();
      return q.every(function (w) { return text.split(/\s+/).some(function (t) { return t.indexOf(w) === 0; }); });
    });
    var col = state.sort, sign = state.desc ? -1 : 1;
    out.sort(function (a, b) {
      var x = col === "key" ? a.gidx : a[col], y = col === "key" ? b.gidx : b[col];
      if (x === null && y === null) return sign * (a.gidx - b.gidx);
      if (x === null) return 1; if (y === null) return -1;
      return x < y ? -sign : x > y ? sign : sign * (a.gidx - b.gidx);
    });
    return out;
  }
  function render() {
    var out = filtered(), pages = Math.max(1, Math.ceil(out.length / per));
    state.page = Math.min(state.page, pages);
    var body = document.querySelector("#index-table tbody");
    body.innerHTML = out.slice((state.page - 1) * per, state.page * per).map(function (r) {
      var label = r.label ? esc(r.label) + ' <span class="prov">' + esc(r.label_model) + " · " + esc(r.label_strategy) + (r.label_baseline ? ' · <b class="baseline">BASELINE</b>' : "") + "</span>" : '<span class="dim">-</span>';
      return '<tr class="row" data-key="' + esc(r.key) + '" data-density="' + r.density + '"><td><a class="ckey" href="' + esc(r.href) + '">' + esc(r.key) + "</a></td><td>" + esc(r.site) + '</td><td class="num">' + r.density.toExponential(3) + '</td><td class="num">' + fmt(r.mean_act) + '</td><td class="num">' + fmt(r.max_act) + "</td><td>" + label + '</td><td class="num">' + fmt(r.detection) + '</td><td class="num">' + fmt(r.fuzzing) + '</td><td class="num">' + fmt(r.intruder) + "</td><td>" + (r.alive ? "alive" : "dead") + '</td><td class="dim">' + esc(r.input_tokens || "") + "</td></tr>";
    }).join("");
    document.getElementById("count").textContent = out.length + " matching · page " + state.page + " of " + pages;
  }
  document.querySelectorAll("a.sort").forEach(function (a) {
    a.addEventListener("click", function (ev) {
      ev.preventDefault();
      var col = a.dataset.col;
      state.desc = state.sort === col ? !state.desc : col !== "key" && col !== "site" && col !== "label";
      state.sort = col; state.page = 1; render();
    });
  });
  document.getElementById("apply").addEventListener("click", function () { state.page = 1; render(); });
  document.getElementById("q").addEventListener("keydown", function (ev) { if (ev.key === "Enter") { state.page = 1; render(); } });
  document.getElementById("prev-page").addEventListener("click", function (ev) { ev.preventDefault(); state.page = Math.max(1, state.page - 1); render(); });
  document.getElementById("next-page").addEventListener("click", function (ev) { ev.preventDefault(); state.page += 1; render(); });
  render();
})();
