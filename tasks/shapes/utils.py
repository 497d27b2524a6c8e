"""Scoring of the embedded shapes tasks (lmms-eval task functions).

Captions are scored with pycocoevalcap (PTB tokenizer, CIDEr, BLEU), as lmms-eval's
caption benchmarks are; yes/no answers with POPE's metrics; letters by exact choice.
"""

import functools
import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from dyrate_eval.embedded.tasks import CAPTION_PROMPT, scene_from_doc
from dyrate_eval.embedded.world import LETTERS, render


def doc_to_visual(doc):
    return [render(scene_from_doc(doc))[0]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def caption_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return CAPTION_PROMPT


# -- captions --------------------------------------------------------------------------


def caption_process_results(doc, results):
    entry = {"doc_id": doc["doc_id"], "references": tuple(doc["captions"]), "prediction": results[0]}
    return {"shapes_CIDEr": entry, "shapes_Bleu_4": entry}


@functools.lru_cache(maxsize=2)
def _tokenized_cached(entries):
    # The PTB tokenizer starts a JVM: tokenize once for both caption metrics of a run.
    tokenizer = PTBTokenizer()
    references = {doc_id: [{"caption": c} for c in refs] for doc_id, refs, _ in entries}
    predictions = {doc_id: [{"caption": prediction}] for doc_id, _, prediction in entries}
    return tokenizer.tokenize(references), tokenizer.tokenize(predictions)


def _tokenized(results):
    return _tokenized_cached(tuple((r["doc_id"], tuple(r["references"]), r["prediction"]) for r in results))


def caption_cider(results, args=None):
    references, predictions = _tokenized(results)
    return Cider().compute_score(references, predictions)[0]


def caption_bleu4(results, args=None):
    references, predictions = _tokenized(results)
    return Bleu(4).compute_score(references, predictions, verbose=0)[0][3]


# -- yes / no ----------------------------------------------------------------------------


def yes_no(text):
    """'yes' when the answer starts with yes, else 'no' (POPE's reading)."""
    words = re.findall(r"[a-z]+", text.lower())
    return "yes" if words and words[0] == "yes" else "no"


def pope_process_results(doc, results):
    entry = {"prediction": yes_no(results[0]), "truth": doc["answer"], "split": doc["split"]}
    return {name: entry for name in ("accuracy", "precision", "recall", "f1", "yes_ratio")}


def _counts(results):
    pairs = [(r["prediction"], r["truth"]) for r in results]
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    return tp, fp, fn, len(pairs)


def pope_accuracy(results, args=None):
    return sum(r["prediction"] == r["truth"] for r in results) / len(results)


def pope_precision(results, args=None):
    tp, fp, _, _ = _counts(results)
    return tp / (tp + fp) if tp + fp else 0.0


def pope_recall(results, args=None):
    tp, _, fn, _ = _counts(results)
    return tp / (tp + fn) if tp + fn else 0.0


def pope_f1(results, args=None):
    precision, recall = pope_precision(results), pope_recall(results)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def pope_yes_ratio(results, args=None):
    return sum(r["prediction"] == "yes" for r in results) / len(results)


# -- multiple choice ---------------------------------------------------------------------


def chosen_letter(text):
    """The first stand-alone option letter in the answer, or None."""
    match = re.search(rf"\b([{LETTERS}])\b", text.strip().upper())
    return match.group(1) if match else None


def mcq_process_results(doc, results):
    return {"accuracy": float(chosen_letter(results[0]) == doc["answer"])}
