// The chain and comparison browsers. Every piece of model text is set with
// textContent: nothing from the data is ever parsed as HTML.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("cai-data").textContent);
  var PAGE = 100;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(x) { return typeof x === "number" ? x.toFixed(3) : (x === null || x === undefined ? "–" : String(x)); }
  function block(label, text) {
    var d = el("div");
    d.appendChild(el("div", "label", label));
    d.appendChild(el("div", "text", text === null || text === undefined ? "(none)" : text));
    return d;
  }
  function conversation(messages) {
    var d = el("div", "text");
    (messages || []).forEach(function (m) {
      var t = el("div", "turn");
      t.appendChild(el("b", null, (m.role === "user" ? "Human" : m.role === "assistant" ? "Assistant" : m.role) + ": "));
      t.appendChild(document.createTextNode(m.content));
      d.appendChild(t);
    });
    return d;
  }
  function principleTag(id, kind) {
    var t = el("span", "tag principle", id);
    t.title = "show only items with this principle";
    t.addEventListener("click", function () { setPrinciple(kind, id); });
    return t;
  }

  function renderChain(c) {
    var d = el("div", "item chain");
    var h = el("h4");
    h.appendChild(el("span", null, c.id));
    h.appendChild(el("span", "tag", c.split));
    if (c.category) h.appendChild(el("span", "tag", c.category));
    h.appendChild(el("span", "tag" + (c.revised ? "" : " warn"), c.revised ? "revised" : "unchanged"));
    if (c.trained_on !== undefined)
      h.appendChild(el("span", "tag" + (c.trained_on ? "" : " warn"),
        "SFT: " + (c.trained_on === "revision" ? "revision" : c.trained_on === "first_answer" ? "first answer" : "not trained on")));
    (c.rounds || []).forEach(function (r) { h.appendChild(principleTag(r.principle_id, "chains")); });
    d.appendChild(h);
    d.appendChild(el("div", "label", "prompt"));
    d.appendChild(conversation(c.messages));
    if (c.initial_system_prompt)
      d.appendChild(block("system prompt the first answer was sampled under (not in the SFT data)", c.initial_system_prompt));
    var g = el("div", "grid");
    g.appendChild(block("first answer", c.initial_response));
    g.appendChild(block("final answer", c.final_response));
    d.appendChild(g);
    var rounds = el("div", "grid3");
    rounds.appendChild(el("div", "label", "round / principle"));
    rounds.appendChild(el("div", "label", "critique"));
    rounds.appendChild(el("div", "label", "revision"));
    function reasons(list) { return list && list.length ? "rejected: " + list.join(", ") : ""; }
    function row(title, principle, status, critique, revision) {
      var who = el("div");
      who.appendChild(el("div", null, title));
      if (principle) who.appendChild(principleTag(principle, "chains"));
      if (status) who.appendChild(el("div", "label", status));
      rounds.appendChild(who);
      rounds.appendChild(el("div", "text", critique === null || critique === undefined ? "(no critique)" : critique));
      rounds.appendChild(el("div", "text", revision === null || revision === undefined ? "(no revision)" : revision));
    }
    (c.rounds || []).forEach(function (r) {
      (r.attempts || []).forEach(function (a, k) {
        row("round " + r.round + ", try " + (k + 1), a.principle_id, reasons(a.reasons), a.critique, a.revision);
      });
      var tries = (r.attempts || []).length;
      row("round " + r.round + (tries ? ", try " + (tries + 1) : ""), r.principle_id,
          r.status + (r.reasons && r.reasons.length ? " (" + r.reasons.join(", ") + ")" : ""), r.critique, r.revision);
      (r.candidates || []).forEach(function (x, k) {
        if (x.revision === r.revision) return;
        row("round " + r.round + ", other sample " + (k + 1), null,
            (reasons(x.reasons) || "not picked") + (x.p_better !== undefined ? ", P(better) " + fmt(x.p_better) : ""),
            null, x.revision);
      });
    });
    d.appendChild(rounds);
    return d;
  }

  function renderComparison(c) {
    var d = el("div", "item comparison");
    var h = el("h4");
    h.appendChild(el("span", null, c.id));
    h.appendChild(el("span", "tag", c.split));
    h.appendChild(el("span", "tag", c.source));
    h.appendChild(el("span", "tag" + (c.status === "labelled" ? "" : " warn"), c.status));
    (c.principle_ids || []).forEach(function (p) { h.appendChild(principleTag(p, "comparisons")); });
    h.appendChild(el("span", "tag", "P(A better) = " + fmt(c.p_a)));
    if (c.p_a_unclamped !== null && c.p_a_unclamped !== undefined && c.p_a_unclamped !== c.p_a)
      h.appendChild(el("span", "tag", "unclamped " + fmt(c.p_a_unclamped)));
    d.appendChild(h);
    d.appendChild(el("div", "label", "prompt"));
    d.appendChild(conversation(c.prompt));
    var g = el("div", "grid");
    g.appendChild(block("response A", c.response_a));
    g.appendChild(block("response B", c.response_b));
    d.appendChild(g);
    var qs = c.queries || [];
    if (qs.length) {
      var t = el("table");
      var hr = el("tr");
      ["principle", "order", "P(first shown better)", "P(A better)", "reasoning"].forEach(function (x) { hr.appendChild(el("th", null, x)); });
      t.appendChild(hr);
      qs.forEach(function (q) {
        var tr = el("tr");
        tr.appendChild(el("td", null, q.principle_id));
        tr.appendChild(el("td", null, q.order === "ab" ? "A shown first" : "B shown first"));
        tr.appendChild(el("td", null, fmt(q.p_first)));
        tr.appendChild(el("td", null, fmt(q.p_a)));
        tr.appendChild(el("td", null, q.abstained ? "(abstained) " + (q.reasoning || "") : (q.reasoning || "")));
        t.appendChild(tr);
      });
      d.appendChild(t);
    }
    return d;
  }

  var views = {
    chains: { items: data.chains || [], render: renderChain,
      principles: function (c) { return (c.rounds || []).map(function (r) { return r.principle_id; }); } },
    comparisons: { items: data.comparisons || [], render: renderComparison,
      principles: function (c) { return c.principle_ids || []; } }
  };

  function setPrinciple(kind, id) {
    var sel = document.getElementById(kind + "-principle");
    if (!sel) return;
    sel.value = id;
    update(kind);
    sel.scrollIntoView({ block: "center" });
  }

  function update(kind) {
    var v = views[kind];
    var q = document.getElementById(kind + "-search").value.trim().toLowerCase();
    var p = document.getElementById(kind + "-principle").value;
    var s = document.getElementById(kind + "-split").value;
    v.matches = v.items.filter(function (it, i) {
      if (p && v.principles(it).indexOf(p) < 0) return false;
      if (s && it.split !== s) return false;
      return !q || v.haystack[i].indexOf(q) >= 0;
    });
    v.shown = 0;
    document.getElementById(kind + "-list").replaceChildren();
    more(kind);
  }

  function more(kind) {
    var v = views[kind];
    var list = document.getElementById(kind + "-list");
    var upto = Math.min(v.matches.length, v.shown + PAGE);
    for (var i = v.shown; i < upto; i++) list.appendChild(v.render(v.matches[i]));
    v.shown = upto;
    document.getElementById(kind + "-count").textContent =
      v.matches.length + " of " + v.items.length + " shown" + (v.shown < v.matches.length ? " (first " + v.shown + ")" : "");
    document.getElementById(kind + "-more").hidden = v.shown >= v.matches.length;
  }

  Object.keys(views).forEach(function (kind) {
    var v = views[kind];
    var search = document.getElementById(kind + "-search");
    if (!search) return;
    v.haystack = v.items.map(function (it) { return JSON.stringify(it).toLowerCase(); });
    var ids = {};
    v.items.forEach(function (it) { v.principles(it).forEach(function (p) { if (p) ids[p] = true; }); });
    var sel = document.getElementById(kind + "-principle");
    Object.keys(ids).sort().forEach(function (p) { var o = el("option", null, p); o.value = p; sel.appendChild(o); });
    search.addEventListener("input", function () { update(kind); });
    sel.addEventListener("change", function () { update(kind); });
    document.getElementById(kind + "-split").addEventListener("change", function () { update(kind); });
    document.getElementById(kind + "-more").addEventListener("click", function () { more(kind); });
    update(kind);
  });

  // Principle ids in the statistics table filter both browsers.
  document.querySelectorAll("table.principles tbody tr").forEach(function (tr) {
    var cell = tr.firstElementChild;
    cell.style.cursor = "pointer";
    cell.title = "filter the chains and comparisons by this principle";
    cell.addEventListener("click", function () {
      var id = cell.textContent;
      ["comparisons", "chains"].forEach(function (k) {
        var sel = document.getElementById(k + "-principle");
        if (sel && Array.prototype.some.call(sel.options, function (o) { return o.value === id; })) setPrinciple(k, id);
      });
    });
  });
})();
