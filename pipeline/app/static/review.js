// The review page: inspect's findings one at a time; relabel, exclude or keep (POST /api/decide).
"use strict";
const KINDS = { label_issues: "Likely label errors", near_duplicates: "Near-duplicates", outliers: "Outliers" };
let data = null, kind = "label_issues", index = 0;
const box = document.getElementById("finding");

async function load() {
  data = await api("/api/review");
  while (data.computing) {  // once per model, in the background: say so, and ask again
    document.getElementById("tabs").replaceChildren();
    box.replaceChildren(el("p", { class: "note computing", text: "Looking at every photo with the model served… " +
      data.seconds.toFixed(0) + " s so far (once per model)." }));
    await new Promise(ok => setTimeout(ok, 1000));
    data = await api("/api/review");
  }
  data.shown = Object.fromEntries(Object.keys(KINDS).map(k => [k, data[k].length]));
  document.getElementById("decided").textContent = data.decided + " decision(s) so far.";
  show();
}

// the tabs count what is left to decide, as decisions are made
function tabs() {
  document.getElementById("tabs").replaceChildren(...Object.entries(KINDS).map(([k, name]) => el("button", {
    class: k === kind ? "here" : "", "data-kind": k, text: name + " (" + remaining(k) + ")",
    onclick: () => { kind = k; index = 0; show(); } })));
}

function current() { return data[kind][index]; }

// what is left of a kind: all it has (the API sends a page of each), less what was decided here since
function remaining(k) { return (data.totals ? data.totals[k] : data[k].length) - (data.shown[k] - data[k].length); }

function show() {
  tabs();
  const f = current();
  if (!f && data[kind].length) {  // passed over with Next, not decided
    box.replaceChildren(el("p", { text: data[kind].length + " finding(s) here passed over with Next, not decided. " }),
      el("button", { "data-action": "again", onclick: () => { index = 0; show(); }, text: "Start again from the first" }));
    return;
  }
  if (!f) { box.replaceChildren(el("p", { text: "Nothing left to review here." })); return; }
  const left = el("div", {}, el("img", { class: "big", src: photoUrl(f.sha256, 768), alt: f.path }),
    el("p", { class: "note", text: f.path }));
  const right = el("div", {});
  if (f.kind === "label_issue") {
    right.append(el("p", {}, "Filed as ", el("b", { text: f.given }), ", looks like ", el("b", { text: f.suggested }),
      " (label quality " + f.score.toFixed(3) + ")."),
      el("p", { class: "note", text: "Nearest training photos of " + f.given + ":" }), neighbourStrip(f.neighbours_given),
      el("p", { class: "note", text: "Nearest training photos of " + f.suggested + ":" }), neighbourStrip(f.neighbours_suggested));
  } else if (f.kind === "near_duplicate") {
    right.append(el("p", {}, "Near-duplicate (similarity " + f.similarity.toFixed(3) + ") of:"),
      el("img", { class: "big", src: photoUrl(f.other, 768), alt: f.other_path }), el("p", { class: "note", text: f.other_path }),
      el("p", { text: (f.leak ? "They straddle splits (" + f.splits.join(" / ") + "): the test score is flattered. " : "") +
        (f.labels_differ ? "Their labels differ: " + f.given + " / " + f.other_label + "." : "Same label: " + f.given + ".") }));
  } else {
    right.append(el("p", {}, "Filed as ", el("b", { text: f.given }), "; unlike any class (typicality " + f.score.toFixed(3) +
      "); nearest other class: " + f.nearest_other_class + "."));
  }
  const actions = el("div", { class: "actions" });
  const relabels = !(f.kind === "near_duplicate" && !f.labels_differ);  // a same-label pair: keep or exclude
  if (relabels && f.suggested) actions.append(el("button", { class: "primary", "data-action": "relabel-suggested",
    onclick: () => decide("relabel", f.suggested), text: "Relabel as " + f.suggested + " (R)" }));
  if (relabels) {
    keys(f).forEach((c, i) => actions.append(el("button", {
      "data-action": "relabel-" + c, onclick: () => decide("relabel", c), text: "→ " + c + " (" + (i + 1) + ")" })));
    // every class, by typing: a picker for the classes that are not among the likely ones
    const picker = el("input", { list: "all-classes", placeholder: "another class…", "aria-label": "relabel as",
                                 class: "picker" });
    const list = el("datalist", { id: "all-classes" }, ...data.classes.map(c => el("option", { value: c })));
    const go = () => { if (data.classes.includes(picker.value) && picker.value !== f.given) decide("relabel", picker.value);
                       else picker.setCustomValidity("not a class"), picker.reportValidity(); };
    picker.addEventListener("keydown", e => { if (e.key === "Enter") go(); });
    actions.append(picker, list, el("button", { "data-action": "relabel-picked", text: "Relabel", onclick: go }));
  }
  actions.append(el("button", { "data-action": "exclude", onclick: () => decide("exclude"), text: "Exclude (X)" }),
    el("button", { "data-action": "keep", onclick: () => decide("keep"), text: "Keep as is (K)" }),
    el("button", { "data-action": "next", onclick: next, text: "Next (N)" }));
  box.replaceChildren(el("div", { class: "finding" }, left, right), actions,
    el("p", { class: "note", text: (index + 1) + " of " + remaining(kind) +
      (remaining(kind) > data[kind].length ? " (decide these, and the next are sent)" : "") }));
}

// the relabel keys 1-9: the classes the model finds most likely for this photo, not the first nine by name
function keys(f) {
  const order = f.likely && f.likely.length ? f.likely : data.classes;
  return order.filter(c => c !== f.given && c !== f.suggested).slice(0, 9);
}

function next() { index = Math.min(index + 1, data[kind].length); show(); }

async function decide(action, label = "") {
  const f = current();
  if (!f) return;
  try {
    const done = await api("/api/decide", { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify({ sha256: f.sha256, action, label }) });
    data[kind].splice(index, 1);
    if (!data[kind].length && remaining(kind) > 0) { await load(); return; }  // the next page of this kind
    document.getElementById("decided").textContent = done.decisions + " decision(s) so far; last: " + done.path + " " + action + (label ? " " + label : "") + ".";
    show();
  } catch (error) { box.append(el("p", { class: "error", text: error.message })); }
}

document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  const f = current(); if (!f) return;
  const key = e.key.toLowerCase();
  const relabels = !(f.kind === "near_duplicate" && !f.labels_differ);
  if (!relabels && (key === "r" || /^[1-9]$/.test(key))) return;
  if (key === "r" && f.suggested) decide("relabel", f.suggested);
  else if (key === "x") decide("exclude");
  else if (key === "k") decide("keep");
  else if (key === "n" || key === "arrowright") next();
  else if (/^[1-9]$/.test(key) && keys(f)[+key - 1]) decide("relabel", keys(f)[+key - 1]);
});

document.getElementById("retrain").addEventListener("click", async () => {
  const out = document.getElementById("retrain-result");
  out.textContent = "retraining…";
  box.replaceChildren(el("p", { class: "note", text: "Retraining, then looking at the photos again…" }));
  document.getElementById("tabs").replaceChildren();
  try {
    const r = await api("/api/retrain", { method: "POST" });
    out.textContent = describeRetrain(r);
    await load(); showModel();
  } catch (error) { out.textContent = error.message; }
});

showModel();
load().catch(error => box.replaceChildren(el("p", { class: "error", text: error.message })));
