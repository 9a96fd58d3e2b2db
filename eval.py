"""Evaluation by hand: the official VQA accuracy, GQA accuracy, NLVR2 accuracy and consistency, and
coco-caption's BLEU, CIDEr-D and ROUGE-L.

    python eval.py vqa --results R.json --questions Q.json --annotations A.json [--out M.json]
        [--karpathy dataset_coco.json --split test]      # only the questions of a Karpathy split
    python eval.py caption --results R.json --karpathy dataset_coco.json --split test [--out M.json]
    python eval.py gqa --results R.json --questions testdev_balanced_questions.json [--out M.json]
    python eval.py nlvr2 --results R.csv --labels test1.json [--out M.json]

Pure standard library. The numbers equal the official tools' (VQA and captions to 1e-6, GQA and
NLVR2 exactly), quirks included:
VQA = GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py at HEAD (a013f00);
captions = pycocoevalcap 1.2 (bleu/bleu_scorer.py, cider/cider_scorer.py, rouge/rouge.py,
tokenizer/ptbtokenizer.py); GQA = the eval.py of the GQA website (gqadataset.org, "Evaluation");
NLVR2 = lil-lab/nlvr nlvr2/eval/metrics.py. "L<n>" in comments are line numbers in the VQA and
pycocoevalcap files named above.

The CLI prints the metrics and writes them as JSON to --out (default: the results file with
".metrics.json" in place of its extension), after checking that it can write there. Bad input is
one line "error: ..." (exit status 2) that names the problem (malformed JSON, wrong field names,
duplicate / unknown / missing ids); nothing is skipped silently, so a score is always over exactly
the questions, images or examples of the reference set.
"""
import argparse
import functools
import json
import math
import os
import re
import tempfile
from collections import Counter

# ---------------------------------------------------------------------------------------------
# VQA accuracy (vqaEval.py @ a013f00)
# ---------------------------------------------------------------------------------------------

# L21-42. Retyped as data. Quirks kept on purpose: the keys with capitals ("Im", "Ive", "Id've",
# "I'dve") can never match because processDigitArticle lower-cases first; "somebody'd" maps to
# "somebodyd"; "let's" and "she's" map to themselves; "its" is not a key.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# L43-55: number words up to ten (nothing else: "eleven" and "no" stay as they are).
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")  # L56-59
# L64-66, in this order. Not listed, hence kept: ' : * # $ % & ^ | ~ and every non-ASCII character;
# '.' is handled by PERIOD_STRIP.
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
         ">", "<", "@", "`", ",", "?", "!"]
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # L63: a comma between two digits
# L62, kept verbatim. "(?!<=\d)" is a negative LOOKAHEAD for the text "<=" + digit (the author
# meant a lookbehind), so it always succeeds: the effective pattern is \.(?!\d), every period not
# followed by a digit.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# L137-139 call PERIOD_STRIP.sub("", text, re.UNICODE): the third positional argument of
# Pattern.sub is `count`, and re.UNICODE == 32, so at most 32 periods are removed.
PERIOD_COUNT = int(re.UNICODE)


def strip_whitespace(s):
    """L87-94: the only step applied unconditionally (no lower-casing here)."""
    return s.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text):
    """L130-140. For each punctuation character, ONE decision for the whole string, taken on the
    original text: delete it everywhere if it touches a space somewhere ("p " or " p") or if the
    text has a digit,digit comma anywhere; otherwise replace it everywhere by a space."""
    out = text
    digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if p not in out:  # replace() would be a no-op either way
            continue
        if digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    if "." in out:
        out = PERIOD_STRIP.sub("", out, PERIOD_COUNT)
    return out


def process_digit_article(text):
    """L142-155: lower-case, split on any whitespace, number words -> digits, drop articles (after
    the mapping), then the contraction map. Only-article answers become ""."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(s):
    """What the official evaluation compares when its unanimity gate is open: the whitespace step,
    processPunctuation, then processDigitArticle. Pure (the original normalises the annotations in
    place and grows manualMap with setdefault; neither is copied). Cached: answers repeat a lot."""
    return process_digit_article(process_punctuation(strip_whitespace(s)))


def vqa_accuracy(pred, answers):
    """Official accuracy of one prediction against the human answers (plain strings), in [0, 1].

    1. whitespace step on both sides (L87-94);
    2. unanimity gate (L96-103): only if the stripped answers are NOT all identical are both sides
       normalised, so "Yes" vs 10 x "yes" scores 0 and "two" vs 10 x "2" scores 0;
    3. leave-one-out (L105-112): for each answer j, min(1, #{i != j: answer_i == pred} / 3), averaged
       over the answers, so k = 0, 1, 2, 3, >=4 matches of 10 give 0, 0.3, 0.6, 0.9, 1.
    The original leaves one out with the dict test `item != gtAnsDatum`, a true leave-one-out only
    because real annotations carry distinct answer_ids (two identical dicts would both be left
    out). We get the answers as plain strings and leave out by position, i.e. what the original
    computes on real annotations.
    """
    if not answers:
        raise ValueError("vqa_accuracy: no human answers")
    gt = [strip_whitespace(a) for a in answers]
    pred = strip_whitespace(pred)
    if len(set(gt)) > 1:
        gt = [normalize_answer(a) for a in gt]
        pred = normalize_answer(pred)
    k = sum(1 for a in gt if a == pred)
    # the same floats, summed in the same order, as the original's gtAcc list
    accs = [min(1, float(k - (a == pred)) / 3) for a in gt]
    return float(sum(accs)) / len(accs)


ID_KINDS = {int: "an integer", str: "a string"}


def check_results(results, ids, id_field, value_field, what, id_type=int):
    """{id: value} from an official results list, e.g. [{"question_id": int, "answer": str}] (VQA),
    [{"image_id": int, "caption": str}] (captions), [{"questionId": str, "prediction": str}] (GQA);
    `ids` are the ids of the reference set, `id_type` the type every id must have (int or str).

    Raises ValueError, naming the problem, for anything that would make a score silently wrong:
    wrong types or field names, duplicate ids, ids outside `ids`, or missing predictions (the
    official loadRes asserts the same equality of id sets)."""
    if not isinstance(results, list):
        raise ValueError(f"{what} results must be a JSON list of {{'{id_field}', '{value_field}'}}, "
                         f"got {type(results).__name__}")
    out, duplicates = {}, []
    for i, r in enumerate(results):
        if not isinstance(r, dict) or id_field not in r or value_field not in r:
            raise ValueError(f"{what} results entry {i} must have the fields '{id_field}' and '{value_field}': {r!r:.200}")
        key, value = r[id_field], r[value_field]
        if type(key) is not id_type:  # exact type: True is not the question id 1
            raise ValueError(f"{what} results entry {i}: {id_field} must be {ID_KINDS[id_type]}, got {key!r:.50}")
        if not isinstance(value, str):
            raise ValueError(f"{what} results entry {i} ({id_field} {key}): {value_field} must be a string, got {value!r:.50}")
        if key in out:
            duplicates.append(key)
        out[key] = value
    wanted = set(ids)
    unknown, missing = sorted(set(out) - wanted), sorted(wanted - set(out))
    problems = []
    if duplicates:
        problems.append(f"{len(duplicates)} duplicate {id_field}s (e.g. {duplicates[:5]})")
    if unknown:
        problems.append(f"{len(unknown)} {id_field}s not in the reference set (e.g. {unknown[:5]})")
    if missing:
        problems.append(f"{len(missing)} of {len(wanted)} {id_field}s have no {value_field} (e.g. {missing[:5]})")
    if problems:
        raise ValueError(f"{what} results do not match the reference set: " + "; ".join(problems))
    return out


def _percent(values, digits=2):
    """L157-163: round(100 * mean, 2), the mean taken over unrounded per-question values."""
    return round(100 * float(sum(values)) / len(values), digits)


def vqa_aggregate(accs, answer_types, question_types=None):
    """L157-163: the official aggregation of per-question accuracies (0..1): overall, per answer type
    and (if given) per question type, each round(100 * mean, 2) over unrounded values."""
    if not accs:
        raise ValueError("no questions to score")
    groups = {"perAnswerType": answer_types, "perQuestionType": question_types}
    out = {"overall": _percent(accs)}
    for name, types in groups.items():
        if types is not None:
            by_type = {}
            for acc, t in zip(accs, types):
                by_type.setdefault(t, []).append(acc)
            out[name] = {t: _percent(v) for t, v in sorted(by_type.items())}
    out["n_questions"] = len(accs)
    return out


def vqa_scores(preds, annotations):
    """Official aggregate accuracy x100 for {question_id: answer} over a list of official
    annotations (every annotation needs a prediction): overall, per answer type, per question type."""
    accs = [vqa_accuracy(preds[a["question_id"]], [x["answer"] for x in a["answers"]]) for a in annotations]
    return vqa_aggregate(accs, [a["answer_type"] for a in annotations], [a["question_type"] for a in annotations])


# ---------------------------------------------------------------------------------------------
# GQA accuracy: the eval.py of the GQA website (gqadataset.org, "Evaluation"; the same metric code
# is in public copies such as junayednaushad/Relation-Network-VQA gqa/eval.py). Only accuracy and
# its groups: consistency, validity, plausibility, grounding and distribution need the choices
# and scene-graph files and are not reported by the CLIP-BART papers.
# ---------------------------------------------------------------------------------------------

# getStepsNum: an operation whose text "operation: argument" contains one of these (plain substring
# tests) is not a reasoning step.
GQA_NOT_A_STEP = ("exist", "query: name", "choose name")
GQA_GROUPS = ("accuracyPerStructuralType", "accuracyPerSemanticType", "accuracyPerSteps", "accuracyPerLength")


def gqa_steps(program):
    """getStepsNum: the number of operations of a question's program ("semantic": [{operation,
    argument, dependencies}]) that count as reasoning steps."""
    return sum(1 for op in program
               if not any(s in f"{op['operation']}: {op['argument']}" for s in GQA_NOT_A_STEP))


def _gqa_mean(scores):
    """avg(l) * 100 as the original computes it (no rounding); None for an empty group, where the
    original prints 0."""
    return float(sum(scores)) / len(scores) * 100 if scores else None


def gqa_scores(preds, questions):
    """Official GQA accuracy (percent, unrounded) for {questionId: prediction} over official
    questions {questionId: question}. Only balanced questions (isBalanced) count. A prediction is
    right iff it equals the answer string exactly: no normalisation, not even of case or spaces.
    Groups as the original: "binary" / "open", where a question is open iff types.structural ==
    "query" (verify, logical, choose and compare questions are all binary, whatever their answer);
    then per structural type, per semantic type, per number of reasoning steps (gqa_steps) and per
    number of words (question.split()), each as [accuracy, number of questions]."""
    overall, binary, open_ = [], [], []
    groups = {name: {} for name in GQA_GROUPS}
    for qid, q in questions.items():
        if not q["isBalanced"]:
            continue
        score = 1.0 if preds[qid] == q["answer"] else 0.0
        overall.append(score)
        (open_ if q["types"]["structural"] == "query" else binary).append(score)
        keys = (q["types"]["structural"], q["types"]["semantic"], gqa_steps(q["semantic"]), len(q["question"].split()))
        for name, key in zip(GQA_GROUPS, keys):
            groups[name].setdefault(key, []).append(score)
    if not overall:
        raise ValueError("no balanced GQA questions to score")
    metrics = {"accuracy": _gqa_mean(overall), "binary": _gqa_mean(binary), "open": _gqa_mean(open_)}
    for name, by_key in groups.items():  # keys sorted as the original prints them; str for JSON
        metrics[name] = {str(k): [_gqa_mean(v), len(v)] for k, v in sorted(by_key.items())}
    metrics["n_questions"] = len(overall)
    return metrics


# ---------------------------------------------------------------------------------------------
# NLVR2 accuracy and consistency: lil-lab/nlvr nlvr2/eval/metrics.py
# ---------------------------------------------------------------------------------------------

NLVR2_LABELS = ("True", "False")


def nlvr2_identifier(identifier):
    """[split, set_id, pair_id, sentence_id] of an identifier such as "dev-850-2-0" (nlvr2/README.md:
    split-set_id-pair_id-sentence-id), or a ValueError."""
    parts = identifier.split("-") if isinstance(identifier, str) else []
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"identifier must look like split-set_id-pair_id-sentence_id, got {identifier!r:.60}")
    return parts


def nlvr2_sentence(identifier):
    """metrics.py's consistency key: the identifier with its pair id blanked ("dev-850-2-0" ->
    "dev-850--0"), i.e. one sentence of one image set, across the image pairs it was written for."""
    parts = nlvr2_identifier(identifier)
    parts[2] = ""
    return "-".join(parts)


def nlvr2_scores(preds, labels):
    """Official NLVR2 metrics, as fractions in [0, 1] like metrics.py prints them, for {identifier:
    prediction} against {identifier: "True" / "False"}: accuracy (printed "precision" by
    metrics.py), the share of examples with prediction.lower() == label.lower(); consistency, the
    share of sentences (nlvr2_sentence groups, single-example groups included) whose examples are
    all right."""
    if not labels:
        raise ValueError("no NLVR2 examples to score")
    correct, sentence_ok = 0, {}
    for identifier, label in labels.items():
        right = preds[identifier].lower() == label.lower()
        correct += right
        key = nlvr2_sentence(identifier)
        sentence_ok[key] = sentence_ok.get(key, True) and right
    return {"accuracy": correct / len(labels), "consistency": sum(sentence_ok.values()) / len(sentence_ok),
            "n_examples": len(labels), "n_sentences": len(sentence_ok)}


# ---------------------------------------------------------------------------------------------
# Caption metrics (pycocoevalcap 1.2). gts = {image_id: [tokenised refs]}, res = {image_id:
# [tokenised candidate]}; per-item values follow the order of gts, as in pycocoevalcap.
# ---------------------------------------------------------------------------------------------

def _check_caption_input(gts, res):
    """The image ids in gts order; the same sanity checks as the pycocoevalcap scorers, as errors."""
    if gts.keys() != res.keys():
        missing, extra = len(gts.keys() - res.keys()), len(res.keys() - gts.keys())
        raise ValueError(f"gts and res must have the same image ids ({missing} without a candidate, {extra} without references)")
    for k in gts:
        if not isinstance(res[k], list) or len(res[k]) != 1 or not isinstance(res[k][0], str):
            raise ValueError(f"res[{k!r}] must be a list with exactly one caption string")
        if not isinstance(gts[k], list) or not gts[k] or not all(isinstance(r, str) for r in gts[k]):
            raise ValueError(f"gts[{k!r}] must be a non-empty list of caption strings")
    if not gts:
        raise ValueError("no images to score")
    return list(gts)


def ngram_counts(words, n=4):
    """Raw counts of the 1..n-grams (tuples) of a word list, one Counter per order: [1-grams,
    2-grams, ...] (bleu_scorer.py / cider_scorer.py precook, L11-26, split by order)."""
    return [Counter(zip(*[words[i:] for i in range(k)])) for k in range(1, n + 1)]


BLEU_TINY, BLEU_SMALL = 1e-15, 1e-9  # bleu_scorer.py L201-202; they matter far above 1e-6


def _bleu_from_counts(correct, guess, testlen, reflen):
    """Cumulative geometric means B_1..B_n with the epsilons and the brevity penalty (L232-240,
    L249-257). A perfect 3-word candidate gets B_4 = (1*1*1*1e-6)^(1/4) = 0.0316, not 0."""
    scores, prod = [], 1.0
    for k in range(len(correct)):
        prod *= float(correct[k] + BLEU_TINY) / (guess[k] + BLEU_SMALL)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + BLEU_TINY) / (reflen + BLEU_SMALL)
    if ratio < 1:  # empty candidate: exp(1 - 1e15) underflows to exactly 0
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(gts, res, n=4):
    """coco-caption BLEU ("closest" reference length): ([B_1..B_n] corpus, [[B_k per image]] x n).
    The corpus score pools the clipped counts and lengths; it is NOT the mean of sentence scores."""
    keys = _check_caption_input(gts, res)
    per_item = [[] for _ in range(n)]
    total_correct, total_guess, total_test, total_ref = [0] * n, [0] * n, 0, 0
    for key in keys:
        max_counts, ref_lens = [Counter() for _ in range(n)], []
        for ref in gts[key]:
            words = ref.split()  # any whitespace, as precook (L27)
            ref_lens.append(len(words))
            for k, counts in enumerate(ngram_counts(words, n)):
                max_counts[k] |= counts  # Counter union = elementwise max
        words = res[key][0].split()
        testlen = len(words)
        # L72: the closest reference length, ties going to the shorter one
        reflen = min((abs(l - testlen), l) for l in ref_lens)[1]
        guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
        correct = [sum(min(max_counts[k][g], c) for g, c in counts.items())  # clipped counts
                   for k, counts in enumerate(ngram_counts(words, n))]
        for k, s in enumerate(_bleu_from_counts(correct, guess, testlen, reflen)):
            per_item[k].append(s)
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
        total_test += testlen
        total_ref += reflen
    return _bleu_from_counts(total_correct, total_guess, total_test, total_ref), per_item


def _tfidf(counts, idf, log_n):
    """counts2vec (L107-131), one order at a time: weights tf * (log N - log max(1, df)) with RAW tf
    (n-grams unseen in the references get df := 1, weight log N), per-order norms, and the
    "length", which counts the BIGRAMS (`if n == 1` with n = len(ngram) - 1): max(0, words - 1)."""
    get = idf.get
    vecs = [{g: float(tf) * get(g, log_n) for g, tf in c.items()} for c in counts]
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vecs]
    return vecs, norms, sum(counts[1].values()) if len(counts) > 1 else 0


def cider(gts, res, n=4, sigma=6.0):
    """CIDEr-D as coco-caption's "CIDEr": (corpus mean, [score per image]).

    Corpus-dependent: the document frequency counts, for each n-gram, the images whose references
    contain it (candidates never count), and idf uses log(number of images). Scoring in batches
    therefore changes the numbers, and a single-image corpus scores 0 (log 1 = 0)."""
    keys = _check_caption_input(gts, res)
    refs = [[ngram_counts(r.split(), n) for r in gts[k]] for k in keys]
    df = Counter()
    for image_refs in refs:  # L93-104: once per image, union over its references
        df.update(set().union(*[c.keys() for ref in image_refs for c in ref]))
    if not df:  # the original fails in max() of an empty dict (L187)
        raise ValueError("CIDEr: the references contain no words")
    log_n = math.log(float(len(keys)))  # L162, natural log
    idf = {g: log_n - math.log(d) for g, d in df.items()}
    penalty_den = 2 * sigma ** 2
    scores = []
    for key, image_refs in zip(keys, refs):
        hyp, hyp_norm, hyp_len = _tfidf(ngram_counts(res[key][0].split(), n), idf, log_n)
        total = [0.0] * n
        for ref_counts in image_refs:
            ref, ref_norm, ref_len = _tfidf(ref_counts, idf, log_n)
            gauss = math.exp(-float(hyp_len - ref_len) ** 2 / penalty_den)  # L158
            for k in range(n):
                # L149-151: clipped tf-idf product, summed in the candidate's n-gram order as in
                # the original (an n-gram outside this reference adds 0)
                ref_k = ref[k]
                val = 0.0
                for g, w_h in hyp[k].items():
                    w_r = ref_k.get(g)
                    if w_r:
                        val += min(w_h, w_r) * w_r
                if hyp_norm[k] != 0 and ref_norm[k] != 0:
                    val /= hyp_norm[k] * ref_norm[k]
                total[k] += val * gauss
        scores.append((sum(total) / n) / len(image_refs) * 10.0)  # L174-178: mean over n, / #refs, x10
    return sum(scores) / len(scores), scores


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists (rouge.py my_lcs, L13-34)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)  # one DP row over the shorter list
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(gts, res, beta=1.2):
    """ROUGE-L F (beta = 1.2): (corpus mean, [score per image]).

    Tokens come from split(" ") (one space, L58/L62: "" gives [""], double spaces give "" tokens),
    unlike BLEU/CIDEr's split(). P and R are maxed over the references INDEPENDENTLY (L68-69), so
    they may come from different references."""
    keys = _check_caption_input(gts, res)
    scores = []
    for key in keys:
        cand = res[key][0].split(" ")
        prec, rec = [], []
        for ref in gts[key]:
            ref_tokens = ref.split(" ")
            lcs = lcs_length(ref_tokens, cand)
            prec.append(lcs / float(len(cand)))
            rec.append(lcs / float(len(ref_tokens)))
        p, r = max(prec), max(rec)
        scores.append(((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p) if p != 0 and r != 0 else 0.0)
    return sum(scores) / len(scores), scores


# ---------------------------------------------------------------------------------------------
# PTB tokenisation (pycocoevalcap tokenizer/ptbtokenizer.py + Stanford CoreNLP 3.4.1 PTBTokenizer
# -preserveLines -lowerCase), in pure Python.
#
# Where ptb_tokenize can differ from the Java tokenizer (measured in tests/test_eval.py):
# - it is a set of rules fitted to CoreNLP's observed output (EVAL_NOTES.md 2.5) and checked against
#   its JFlex grammar (PTBLexer.flex at v3.4.1), not a port of it: rare constructs can split
#   differently, e.g. "red@x", "3 1/2street", "a1.5-b", "AT&T., x", "x'em", Unicode symbols other
#   than those mapped below, apostrophe words outside the few listed, abbreviations missing from the
#   tables below;
# - the abbreviation tables are case-insensitive except for the few Java only knows capitalised;
# - a caption's end counts as a line break. Java sees none after the very last caption of a call, so
#   there a one-letter initial before a sentence start ("plan B. The") keeps its period (Java "b.");
# - line breaks (\r, \v, \f, \x85, \u2028, \u2029) become spaces. The Java wrapper joins captions
#   with '\n', so there they silently shift every following caption by one line (not reproduced);
# - Java drops characters it cannot tokenise (emoji, Roman numerals, some currency signs) and ends
#   the token there; we replace by a space the characters outside the Basic Multilingual Plane,
#   control characters, the signs listed in _PTB_DROP and the number characters of _ptb_clean. That
#   space matters only after a one-letter initial: "B. The😀" (Java "b. the", ours "b the").
# ---------------------------------------------------------------------------------------------

# ptbtokenizer.py L21-22, verbatim. Applied to LOWER-CASED tokens, so "-LRB-" etc. never match and
# brackets survive as -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-. Multi-character tokens ("?!", "!!") stay.
PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                    ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_PTB_CHARS = {"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'", "\u201a": "'",
              "\u2014": "--", "\u2013": "--", "\u00a3": "#", "\u20ac": "$",
              "\u00a2": " cents ", "\u00a0": " ", "\r": " ", "\x0b": " ", "\x0c": " ", "\x85": " ",
              "\u2028": " ", "\u2029": " ", "\n": " ", "\t": " "}
_PTB_DROP = {"\u20b9"}
_PTB_FRACTIONS = {"\u00bd": "1/2", "\u00bc": "1/4", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Superscript or subscript digits, with an optional sign: one token of their own ("x²" -> x ²).
_PTB_SUBSUP = re.compile("[\u207a\u207b\u208a\u208b]?"
                         "(?:[\u00b9\u00b2\u00b3\u2070\u2074-\u2079]+|[\u2080-\u2089]+)")
# An SGML tag, attributes and all; Java turns its spaces into no-break spaces ("<b x>" one token).
_PTB_SGML = re.compile(
    r"""<(?:[!?][A-Za-z-][^>]*|{n}(?:{s}+{n}(?:{s}*={s}*(?:'[^']*'|"[^"]*"))?)*{s}*/?|/{n}){s}*>"""
    .format(n="[A-Za-z][A-Za-z0-9_:.-]*", s="[ \xa0]"))
# A period after these stays on the word (measured on CoreNLP 3.4.1, any case) ...
_ABBREV_ALWAYS = set("""adm al ala apr ariz assn atty aug ave bancorp bhd blvd brig bros calif capt cf
    cmdr co col colo comdr conn corp cos cpl ct dak dec dept det dr drs esq est etc feb fla fri ft ga
    gen gov govs hon inc ind intl jan jr jul jun kan kans ky lieut lt ltd maj mar md messrs mich minn
    mlle mme mo mon mont mr mrs ms mt neb nev nov oct okla penn pfc ph ph.d plc pres prof profs pty pvt
    rd rep reps rev sen sens sep sept sgt spc sq sr st ste supt sys tel tenn thu thurs tue tues univ va
    vs vt wed wis wisc wyo""".split())
# ... only when capitalised ("Wash." but "wash.") ...
_ABBREV_CAPITALISED = set("ark az del ill la mass miss ore pa tex wash".split())
# ... only before a number, at most one space away ("No. 5", but "the answer is no.").
_ABBREV_BEFORE_NUMBER = set("art ca fig no nos op pp".split())
_ACRONYM = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")  # a / u.s / p.m / e.g: single letters
# A one-letter initial loses its period before these capitalised words ("plan B. The end").
_SENTENCE_STARTERS = set("""about according additionally after an a as at but earlier he her here however
    if in it last many more mr. ms. now once one other our she since so some such that the their then
    there these they this we when while what yet you""".split())
# Any word, number-free hyphenated compound or "a_b" keeps a period that precedes , ; : ("dog., x").
_PTB_THING = re.compile(r"(?!\d+(?:\.\d+)+$)[^\W_]+(?:[-_.][^\W_]+)*")
# Token shapes; at each position the LONGEST match wins, ties to the earlier entry (as in JFlex).
_PTB_TOKENS = [re.compile(p) for p in (
    r"(?:https?://|www\.)[^\s\"'<>()\[\]{}]*[\w/]",  # URLs
    r"[\w.+-]+@\w+(?:\.\w+)+",                          # e-mail addresses
    r"[@#][^\W\d_]\w*",                                 # @home, #hashtag (but "#1" -> "# 1")
    _PTB_SGML.pattern, _PTB_SUBSUP.pattern,             # <b x="1">, x⁻²
    r"'[2-9]0s", r"'\d\d(?!\S)", r"'t(?=is\b)",         # '90s, '90, 'tis -> 't is
    r"(?i)'(?:[msd]|re|ve|ll)(?![a-z])|'(?:em|till?|cause|n')|'n(?!\S)",  # man 's, 'em, rock 'n' roll
    r"[A-Z]+&[A-Z]+", r"[A-Z]+\$",                      # AT&T, US$ (but at&t -> at & t, us$ -> us $)
    r"[^\W\d_]\+\+",                                    # c++
    r"[^\W\d_]\w*(?:[-/]\w+|\.[^\W\d_]\w*|'[^\W\d_]+)*",  # words: t-shirt, red/white, o'clock, hello.world
    r"[-+]?\d*(?:[.:,]\d+)+|[-+]?\d+",                  # numbers: 5.00, 1,000, 3:30, .5, -10; 3.5 mm
    r"\d+(?:[.,]\d+)*(?:[-/]\w+)+",                     # 3.5-inch, 1/2, 3-4, 5-year-old
    r"\d\w*(?:[-/]\w+|'[^\W\d_]+)*",                    # words starting with a digit: 10am, 2x4, 1920's
    r"\d+\xa0\d+/\d+",                                  # 3 1/2 (joined below with a no-break space)
    r"[?!]+", r"\.{2,}", r"-{2,}", r"''|``",            # ?! !!! ... -- as one token
    r"[^\s]",                                           # anything else: one character
)]
_CLITIC = re.compile(r"(?i)(.*\w)('s|'re|'ll|'d|'ve|'m)")
_N_QUOTE = re.compile(r"(?i)(\w+)('n')(\w+)")
_NT = re.compile(r"(?i)(.*[^\W\d_])(n't)")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "gimme": ("gim", "me"), "lemme": ("lem", "me")}


def _ptb_clean(caption):
    """Character-level normalisation: quotes, dashes, currency, line breaks, number characters,
    fractions, spaces inside SGML tags."""
    chars = []
    for ch in caption:
        if ch in _PTB_CHARS:
            chars.append(_PTB_CHARS[ch])
        elif ord(ch) > 0xFFFF or ch in _PTB_DROP or ord(ch) < 32:
            chars.append(" ")  # Java: "Untokenizable", dropped; the token ends there
        elif ch.isalnum() and not (ch.isalpha() or ch.isdecimal()):
            # a number character (Unicode No, Nl): \w to Python, but never inside a Java word
            if ch in _PTB_FRACTIONS or _PTB_SUBSUP.match(ch):
                chars.append(ch)  # ½ -> " 1/2 ", x²³ -> "x ²³ " below
            elif "\u2155" <= ch <= "\u215e" or "\u2200" <= ch <= "\u2bff":
                chars.append(f" {ch} ")  # ⅕-⅞ and the circled digits ① ⑴ ❶: tokens of their own
            else:
                chars.append(" ")  # Roman numerals Ⅻ, 〇, ...: untokenisable
        else:
            chars.append(ch)
    text = _PTB_SUBSUP.sub(" \\g<0> ", "".join(chars))
    text = _PTB_SGML.sub(lambda m: m.group().replace(" ", "\xa0"), text)
    # "3 1/2" is ONE token with a no-break space; a Unicode fraction ("3 ½") is not joined
    text = re.sub(r"(?<![\w.,/])(\d+) (\d+/\d+)(?![\w/])", "\\1\xa0\\2", text)
    for ch, frac in _PTB_FRACTIONS.items():
        text = text.replace(ch, f" {frac} ")
    return text


def _split_clitics(word):
    """do n't, it 's, i 'd 've, can not, gon na, y' all."""
    low = word.lower()
    if low in _SPLIT_WORDS:
        a, b = _SPLIT_WORDS[low]
        return [word[:len(a)], word[len(a):]]
    if low == "y'all":
        return [word[:2], word[2:]]
    m = _N_QUOTE.fullmatch(word)
    if m:
        return list(m.groups())
    tail = []
    while True:
        m = _CLITIC.fullmatch(word) or _NT.fullmatch(word)
        if not m:
            return [word] + tail
        word, tail = m.group(1), [m.group(2)] + tail


def _ptb_lex(text):
    """Tokens of the cleaned text: in each whitespace-free chunk the longest match over _PTB_TOKENS,
    clitics split off; a "." right after a token stays on it where _keeps_period says so."""
    tokens = []
    for chunk in re.finditer(r"(?:\S|\xa0)+", text):
        pos, end = chunk.span()
        while pos < end:
            if text[pos] == "." and pos > chunk.start() and _keeps_period(tokens[-1], text, pos):
                tokens[-1] += "."  # "p.m." keeps its period; lexing goes on after it ("p.m.." -> p.m. .)
                pos += 1
                continue
            best = ""
            for pattern in _PTB_TOKENS:
                m = pattern.match(text, pos, end)
                if m and len(m.group()) > len(best):
                    best = m.group()
            tokens.extend(_split_clitics(best) if "'" in best[1:] or best.lower() in _SPLIT_WORDS else [best])
            pos += len(best)
    return tokens


def _keeps_period(word, text, i):
    """Whether CoreNLP leaves the "." at text[i], directly after `word`, on the word."""
    after, low = text[i + 1:], word.lower()
    if after[:1] in (",", ";", ":", "\u3001") and _PTB_THING.fullmatch(word):
        return True
    start = re.match(r"\s+(\S+)\s", after + " ")  # the caption's end counts as a line break
    if len(word) == 1 and start and start[1][:1].isupper() and start[1].lower() in _SENTENCE_STARTERS:
        return False
    return (low in _ABBREV_ALWAYS or _ACRONYM.fullmatch(word) is not None
            or (low in _ABBREV_CAPITALISED and word[:1].isupper())
            or (low in _ABBREV_BEFORE_NUMBER and re.match(r"\s?\d", after) is not None))


def ptb_tokenize(caption):
    """One caption as coco-caption tokenises it: CoreNLP PTBTokenizer (-lowerCase) followed by the
    punctuation filter of ptbtokenizer.py, tokens joined by single spaces ("" for no tokens)."""
    out = []
    for tok in _ptb_lex(_ptb_clean(caption)):
        tok = _PTB_BRACKETS.get(tok, tok).lower()
        if tok == '"':
            tok = "''"  # a double quote becomes `` or '', both filtered
        elif tok.startswith("..") or tok == "\u2026":
            tok = "..."  # "…" and runs of periods: "..." plus leftover "." tokens, all filtered
        if tok not in PTB_PUNCTUATIONS:
            out.append(tok)
    return " ".join(out)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def read_text(path, what):
    """The UTF-8 text of a file, or a ValueError naming the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} file {path} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise ValueError(f"{what} file {path} cannot be read: {e.strerror or e}") from None


def load_json(path, what):
    """Parsed JSON, or a ValueError naming the file."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None


def read_jsonl(path, what):
    """[(line number, object)] of a JSON-lines file (one JSON object a line, blank lines skipped),
    or a ValueError naming the file and the line."""
    rows = []
    for n, line in enumerate(read_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} file {path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{what} file {path}, line {n}: not a JSON object")
        rows.append((n, obj))
    if not rows:
        raise ValueError(f"{what} file {path} has no lines")
    return rows


def _field(obj, key, what, path):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{what} file {path} has no field {key!r}")
    return obj[key]


def _as_list(paths):
    return [paths] if isinstance(paths, str) else list(paths)


def _check_vqa_answers(ann, path):
    """An annotation's "answers" must be a non-empty list of {"answer": str}."""
    answers = ann["answers"]
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"annotations file {path}: question {ann['question_id']} has no human answers")
    for j, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
            raise ValueError(f"annotations file {path}: question {ann['question_id']}, answer {j} "
                             f"has no string field 'answer': {a!r:.100}")


def read_vqa_files(questions_paths, annotations_paths):
    """(questions, annotations) of one or more official VQA question and annotation files, checked
    for the fields scoring reads."""
    questions, annotations = [], []
    for path in _as_list(questions_paths):
        for q in _field(load_json(path, "questions"), "questions", "questions", path):
            for key in ("question_id", "image_id"):
                _field(q, key, "a question in the questions", path)
            questions.append(q)
    for path in _as_list(annotations_paths):
        for i, ann in enumerate(_field(load_json(path, "annotations"), "annotations", "annotations", path)):
            for key in ("question_id", "image_id", "answers", "answer_type", "question_type"):
                _field(ann, key, f"annotation {i} in the annotations", path)
            _check_vqa_answers(ann, path)
            annotations.append(ann)
    return questions, annotations


def score_vqa_files(results_path, questions_paths, annotations_paths, karpathy=None, split="test"):
    """Metrics dict for an official VQA results file against official questions / annotations
    files (one path or a list: a Karpathy split can span train2014 and val2014). With karpathy
    (dataset_coco.json) the reference questions are those on the images of that Karpathy split, and
    every image of the split must have questions in the files."""
    questions, annotations = read_vqa_files(questions_paths, annotations_paths)
    ann_files = ", ".join(_as_list(annotations_paths))
    if karpathy:
        images = {_field(img, "cocoid", "an image in the Karpathy split", karpathy)
                  for img in karpathy_images(karpathy, split)}
        questions = [q for q in questions if q["image_id"] in images]
        annotations = [a for a in annotations if a["image_id"] in images]
        missing = sorted(images - {a["image_id"] for a in annotations})
        if missing:
            raise ValueError(f"{len(missing)} of {len(images)} images of Karpathy split {split!r} have no "
                             f"question in {ann_files} (e.g. {missing[:5]}); Karpathy train (train + "
                             f"restval) spans train2014 and val2014: give both files")
    ann_ids = [a["question_id"] for a in annotations]
    if len(set(ann_ids)) != len(ann_ids):
        raise ValueError(f"annotations files {ann_files} repeat question_ids")
    question_ids = {q["question_id"] for q in questions}
    if question_ids != set(ann_ids):
        raise ValueError(f"questions files {', '.join(_as_list(questions_paths))} and annotations files "
                         f"{ann_files} cover different question_ids ({len(question_ids)} vs {len(ann_ids)})")
    preds = check_results(load_json(results_path, "results"), ann_ids, "question_id", "answer", "VQA")
    return vqa_scores(preds, annotations)


KARPATHY_SPLITS = {"train": {"train", "restval"}, "restval": {"restval"}, "val": {"val"}, "test": {"test"}}


def karpathy_images(karpathy_path, split):
    """The images of dataset_coco.json in a Karpathy split (train = train + restval), in file order."""
    images = _field(load_json(karpathy_path, "Karpathy split"), "images", "Karpathy split", karpathy_path)
    chosen = [img for img in images
              if _field(img, "split", "an image in the Karpathy split", karpathy_path) in KARPATHY_SPLITS[split]]
    if not chosen:
        raise ValueError(f"Karpathy split file {karpathy_path} has no images in split {split!r}")
    return chosen


def karpathy_references(karpathy_path, split):
    """{cocoid: [PTB-tokenised raw sentences]} for the images of a Karpathy split (train = train +
    restval), in file order."""
    gts = {}
    for img in karpathy_images(karpathy_path, split):
        cocoid = _field(img, "cocoid", "an image in the Karpathy split", karpathy_path)
        sentences = _field(img, "sentences", "an image in the Karpathy split", karpathy_path)
        gts[cocoid] = [ptb_tokenize(_field(s, "raw", "a sentence in the Karpathy split", karpathy_path))
                       for s in sentences]
    return gts


def caption_scores(gts, captions):
    """coco-caption metrics for raw candidate captions {image_id: str} against tokenised refs."""
    res = {k: [ptb_tokenize(captions[k])] for k in gts}
    bleus, _ = bleu(gts, res)
    metrics = {f"Bleu_{k + 1}": b for k, b in enumerate(bleus)}
    metrics["ROUGE_L"] = rouge_l(gts, res)[0]
    metrics["CIDEr"] = cider(gts, res)[0]
    metrics["n_images"] = len(gts)
    return metrics


def score_caption_files(results_path, karpathy_path, split):
    gts = karpathy_references(karpathy_path, split)
    captions = check_results(load_json(results_path, "results"), gts, "image_id", "caption", "caption")
    return caption_scores(gts, captions)


def read_gqa_questions(path):
    """An official GQA questions file, {questionId: question}, checked for the fields scoring reads:
    question, answer, isBalanced, types.structural, types.semantic and the program "semantic"."""
    questions = load_json(path, "GQA questions")
    if not isinstance(questions, dict) or not questions:
        raise ValueError(f"GQA questions file {path} must be a non-empty JSON object {{questionId: question}}")
    fields = (("question", str, "a string"), ("answer", str, "a string"), ("isBalanced", bool, "true / false"),
              ("types", dict, "an object"), ("semantic", list, "a list"))
    for qid, q in questions.items():
        for key, kind, name in fields:
            if not isinstance(q, dict) or not isinstance(q.get(key), kind):
                raise ValueError(f"GQA questions file {path}, question {qid}: field {key!r} missing or not {name}")
        for key in ("structural", "semantic"):
            if not isinstance(q["types"].get(key), str):
                raise ValueError(f"GQA questions file {path}, question {qid}: field 'types' has no string {key!r}")
        for op in q["semantic"]:
            if not isinstance(op, dict) or not isinstance(op.get("operation"), str) or "argument" not in op:
                raise ValueError(f"GQA questions file {path}, question {qid}: a 'semantic' operation lacks "
                                 f"'operation' or 'argument': {op!r:.100}")
    return questions


def score_gqa_files(results_path, questions_path):
    """Metrics dict for official GQA predictions [{"questionId": str, "prediction": str}], one for
    every question of the questions file (a balanced file, e.g. testdev_balanced_questions.json: the
    original asks predictions for every balanced question, and for every question with
    --consistency)."""
    questions = read_gqa_questions(questions_path)
    preds = check_results(load_json(results_path, "results"), questions, "questionId", "prediction", "GQA",
                          id_type=str)
    return gqa_scores(preds, questions)


def read_nlvr2_lines(path, what="NLVR2"):
    """[(where, object)] of an official NLVR2 JSON-lines file (train.json, dev.json, test1.json), each
    line checked for an identifier split-set_id-pair_id-sentence_id that no other line has and a label
    "True" or "False"; `where` ("NLVR2 file F, line N") prefixes the errors of later checks."""
    rows, seen = [], set()
    for n, obj in read_jsonl(path, what):
        where = f"{what} file {path}, line {n}"
        try:
            nlvr2_identifier(obj.get("identifier"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if obj["identifier"] in seen:
            raise ValueError(f"{where}: identifier {obj['identifier']} repeats an earlier line")
        seen.add(obj["identifier"])
        if obj.get("label") not in NLVR2_LABELS:
            raise ValueError(f"{where}: label must be \"True\" or \"False\", got {obj.get('label')!r:.50}")
        rows.append((where, obj))
    return rows


def read_nlvr2_labels(path):
    """{identifier: "True" / "False"} of an official NLVR2 file: what metrics.py reads."""
    return {obj["identifier"]: obj["label"] for _, obj in read_nlvr2_lines(path, "NLVR2 labels")}


def read_nlvr2_predictions(path):
    """The official NLVR2 predictions file, CSV without a header: one "identifier,prediction" a line
    (metrics.py reads the first two comma-separated fields of each stripped line; blank lines are
    skipped here). As [{"identifier", "prediction"}] for check_results. A prediction that is not
    True or False in some case is an error here; metrics.py would silently count it wrong."""
    rows = []
    for n, line in enumerate(read_text(path, "results").split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        fields = line.split(",")
        if len(fields) < 2:
            raise ValueError(f"NLVR2 results file {path}, line {n}: expected 'identifier,prediction', got {line!r:.80}")
        if fields[1].lower() not in ("true", "false"):
            raise ValueError(f"NLVR2 results file {path}, line {n}: prediction must be True or False, "
                             f"got {fields[1]!r:.50}")
        rows.append({"identifier": fields[0], "prediction": fields[1]})
    return rows


def score_nlvr2_files(results_path, labels_path):
    """Metrics dict for an official NLVR2 predictions CSV against an official JSON-lines file."""
    labels = read_nlvr2_labels(labels_path)
    preds = check_results(read_nlvr2_predictions(results_path), labels, "identifier", "prediction", "NLVR2",
                          id_type=str)
    return nlvr2_scores(preds, labels)


def atomic_write(path, write, mode="w"):
    """The project's one file writer (data.py, models.py and train.py use it too): write(f) into a
    temporary file beside `path`, then os.replace, so a crash never leaves a half-written file. The
    file gets the permissions open() would give it (0666 minus the umask), not mkstemp's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj, path, indent=2):
    """Atomic write of a JSON file (atomic_write); encoded in one go (json.dumps is several times faster than
    json.dump's piecewise writes)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    atomic_write(path, lambda f: f.write(text))


def check_writable(path):
    """Fail before any scoring if the metrics file cannot be written: its folder is missing or not a
    folder, the path is a folder, or the folder refuses a new file (permissions, read-only disk)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a folder; --out takes a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"output folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


def default_out(results_path):
    """R.json (or R.csv) -> R.metrics.json, next to the results file."""
    return os.path.splitext(results_path)[0] + ".metrics.json"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad options: one line, no usage block (python eval.py TASK --help lists them)."""
        self.exit(2, f"error: {message} (see python eval.py --help)\n")


OUT_HELP = "metrics JSON to write (default: RESULTS with .metrics.json in place of its extension)"


def build_parser():
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True, metavar="{vqa,caption,gqa,nlvr2}")
    p = sub.add_parser("vqa", help="official VQA accuracy of a results file")
    p.add_argument("--results", required=True, help='[{"question_id": int, "answer": str}]')
    p.add_argument("--questions", required=True, nargs="+",
                   help="v2_OpenEnded_mscoco_{train2014,val2014}_questions.json (one or both)")
    p.add_argument("--annotations", required=True, nargs="+",
                   help="v2_mscoco_{train2014,val2014}_annotations.json, the same subsets")
    p.add_argument("--karpathy", help="dataset_coco.json: score only the questions on the images of "
                                      "--split, e.g. the results of a Karpathy-split run")
    p.add_argument("--split", choices=sorted(KARPATHY_SPLITS),
                   help="the Karpathy split for --karpathy (default test; train = train + restval)")
    p.add_argument("--out", help=OUT_HELP)
    p = sub.add_parser("caption", help="BLEU-1..4, ROUGE-L, CIDEr-D of a results file")
    p.add_argument("--results", required=True, help='[{"image_id": cocoid, "caption": str}]')
    p.add_argument("--karpathy", required=True, help="dataset_coco.json (references: sentences[].raw)")
    p.add_argument("--split", default="test", choices=sorted(KARPATHY_SPLITS),
                   help="the Karpathy split whose images are scored (default test; train = train + restval)")
    p.add_argument("--out", help=OUT_HELP)
    p = sub.add_parser("gqa", help="official GQA accuracy (overall, binary / open, per type and length)")
    p.add_argument("--results", required=True, help='[{"questionId": str, "prediction": str}], every question')
    p.add_argument("--questions", required=True, help="e.g. testdev_balanced_questions.json (questions1.2)")
    p.add_argument("--out", help=OUT_HELP)
    p = sub.add_parser("nlvr2", help="official NLVR2 accuracy and consistency")
    p.add_argument("--results", required=True, help="CSV, no header: one identifier,prediction (True / False) a line")
    p.add_argument("--labels", required=True, help="nlvr2/data/{dev,test1}.json (one JSON object a line)")
    p.add_argument("--out", help=OUT_HELP)
    return parser


def score(args):
    """The metrics dict of the parsed command line."""
    if args.task == "vqa":
        return score_vqa_files(args.results, args.questions, args.annotations, args.karpathy, args.split or "test")
    if args.task == "caption":
        return score_caption_files(args.results, args.karpathy, args.split)
    if args.task == "gqa":
        return score_gqa_files(args.results, args.questions)
    return score_nlvr2_files(args.results, args.labels)


def _shown(value):
    if isinstance(value, list):  # [accuracy, number of questions]
        return f"{value[0]:.2f} ({value[1]})"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def print_metrics(metrics):
    for key, value in metrics.items():
        if isinstance(value, dict):
            print(f"{key}: " + ", ".join(f"{t}: {_shown(v)}" for t, v in value.items()))
        else:
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task == "vqa" and args.split and not args.karpathy:
        parser.error("--split needs --karpathy")
    out = args.out or default_out(args.results)
    try:
        check_writable(out)
        metrics = score(args)
        write_json(metrics, out)
    except (ValueError, OSError, RuntimeError) as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        parser.exit(2, f"error: {lines[-1].strip() if lines else type(e).__name__}\n")
    print_metrics(metrics)
    print(f"wrote {out}")
    return metrics


if __name__ == "__main__":
    main()
