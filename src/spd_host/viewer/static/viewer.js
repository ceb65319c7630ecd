// spd-host viewer: charts (Chart.js, vendored), token hover, keyboard navigation.
(function () {
  "use strict";
  function charts() {
    document.querySelectorAll("canvas.chart").forEach(function (el) {
      var spec = JSON.parse(el.dataset.chart);
      if (typeof Chart === "undefined") return;
      new Chart(el, {
        type: "bar",
        data: { labels: spec.labels, datasets: spec.datasets },
        options: {
          animation: false, responsive: true,
          plugins: { legend: { display: spec.datasets.length > 1 } },
          scales: { x: { title: { display: true, text: spec.x || "" } }, y: { title: { display: true, text: spec.y || "count" } } }
        }
      });
    });
  }
  function hover() {
    var tip = document.createElement("div");
    tip.id = "tip";
    document.body.appendChild(tip);
    document.addEventListener("mouseover", function (ev) {
      var t = ev.target.closest ? ev.target.closest(".tok") : null;
      if (!t) { tip.style.display = "none"; return; }
      var acts = JSON.parse(t.dataset.acts || "{}");
      var lines = [JSON.stringify(t.textContent) + "  (token " + t.dataset.id + ")"];
      Object.keys(acts).forEach(function (k) { lines.push(k + " = " + acts[k].toPrecision(4)); });
      if (t.classList.contains("fired")) lines.push("fires here");
      tip.textContent = lines.join("\n");
      tip.style.display = "block";
    });
    document.addEventListener("mousemove", function (ev) {
      tip.style.left = (ev.clientX + 14) + "px";
      tip.style.top = (ev.clientY + 14) + "px";
    });
  }
  function keys() {
    var nav = document.getElementById("kbd");
    if (!nav) return;
    document.addEventListener("keydown", function (ev) {
      if (ev.target && /INPUT|SELECT|TEXTAREA/.test(ev.target.tagName)) return;
      var to = null;
      if (ev.key === "ArrowRight" || ev.key === "j") to = nav.dataset.next;
      if (ev.key === "ArrowLeft" || ev.key === "k") to = nav.dataset.prev;
      if (to) window.location.href = to;
    });
  }
  document.addEventListener("DOMContentLoaded", function () { charts(); hover(); keys(); });
})();
