"""The review page's findings: inspect run on the cache of the model served, with the neighbours of each photo
in question, by content hash."""
from __future__ import annotations


def findings(served) -> dict:
    """inspect's findings (run on the cache), by content hash, with neighbours of the photos in question."""
    from pipeline.use import inspect

    result = inspect.run(served.project, processes=1)  # no fork from a process with request threads
    sha_of = served.sha_of_path
    rows = served.cached_rows([sha_of[q["path"]] for q in result.label_issues if q["path"] in sha_of])
    issues = []
    for q in result.label_issues:
        sha = sha_of.get(q["path"])
        row = rows.get(sha)
        issues.append({"kind": "label_issue", "sha256": sha, "path": q["path"], "given": q["given"],
                       "suggested": q["suggested"], "score": round(q["score"], 4),
                       "neighbours_given": served.neighbours(row, 4, q["given"], other_than=sha),
                       "neighbours_suggested": served.neighbours(row, 4, q["suggested"], other_than=sha)})
    pairs = [{"kind": "near_duplicate", "sha256": sha_of.get(q["path_b"]), "other": sha_of.get(q["path_a"]),
              "path": q["path_b"], "other_path": q["path_a"], "similarity": round(q["similarity"], 4),
              "leak": q["leak"], "labels_differ": q["labels_differ"], "given": q["label_b"],
              "other_label": q["label_a"], "splits": [q["split_b"], q["split_a"]]} for q in result.near_duplicates]
    outliers = [{"kind": "outlier", "sha256": sha_of.get(q["path"]), "path": q["path"], "given": q["label"],
                 "score": round(q["score"], 4), "nearest_other_class": q["nearest_other_class"]}
                for q in result.outliers]
    found = {"label_issues": issues, "near_duplicates": pairs, "outliers": outliers}
    found = {kind: [f for f in items if f["sha256"]] for kind, items in found.items()}  # photos still in the cache
    _add_likely(served, [f for items in found.values() for f in items])
    return found


def _add_likely(served, items: list[dict], k: int = 9) -> None:
    """Each finding's ``likely``: the classes the model finds most likely for its photo, best first (the
    relabel keys 1-9), read from the cache in one pass."""
    if not items or served.trained.inputs.layer != "pooled":
        return
    rows = served.cached_rows([f["sha256"] for f in items])
    shas = [sha for sha in dict.fromkeys(f["sha256"] for f in items) if sha in rows]
    if not shas:
        return
    import numpy as np

    with served.lock:
        probabilities, _ = served.trained.classifier.answer(np.stack([rows[sha] for sha in shas]))
    classes = served.classes
    best = {sha: [classes[c] for c in np.argsort(-p)[:k]] for sha, p in zip(shas, probabilities)}
    for f in items:
        f["likely"] = best.get(f["sha256"], [])
