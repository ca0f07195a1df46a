"""IBM Model 1 (bayes_em.models.ibm1) against nltk's IBMModel1 on tests/data/ibm1_de_en.json.

Both start from the uniform table t(f | e) = 1 / |target vocabulary| and run the same number of
EM iterations; nltk puts the NULL word (None) at the front of every source sentence, as
``ibm1_corpus`` does. Differences from nltk, none of which touch the entries compared:

- nltk updates only the (f, e) pairs that co-occur in some sentence pair; the others keep their
  initial 1/|V_f| (its rows are not normalised). EM gives them exactly 0, as ours does. Only
  co-occurring pairs enter the likelihood, so the fits agree on every pair that matters; the
  test compares those, and checks our zeros and row sums.
- nltk floors every probability at MIN_PROB = 1e-12; no entry here gets near it.
- nltk normalises the expected counts per target *word*, not per position, so a word that appears
  twice in one target sentence is counted once; the corpus has no such repeat.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from bayes_em import EM, models

nltk_translate = pytest.importorskip("nltk.translate")

DATA = pathlib.Path(__file__).parent / "data" / "ibm1_de_en.json"


def corpus():
    pairs = json.loads(DATA.read_text(encoding="utf-8"))["pairs"]
    return [(en.split(), de.split()) for en, de in pairs]


def test_translation_table_matches_nltk():
    pairs = corpus()
    assert all(len(set(de)) == len(de) for _, de in pairs)  # see the module docstring
    n_iter = 5
    c = models.ibm1_corpus(pairs)
    result = EM(models.ibm1, max_iter=n_iter, tol=0.0, progress_bar=False).run(
        jax.random.PRNGKey(0), c["src"], c["tgt"], c["src_mask"], c["tgt_mask"],
        len(c["src_vocab"]), len(c["tgt_vocab"]))
    assert result.n_iter == n_iter
    assert result.mstep_paths == {"t": "closed-form categorical"}
    obj = result.trace()["objective"]
    assert np.all(np.diff(obj) >= -1e-10 * np.abs(obj).max())

    # nltk: AlignedSent(words, mots) translates mots (source) -> words (target)
    bitext = [nltk_translate.AlignedSent(de, en) for en, de in pairs]
    ibm = nltk_translate.IBMModel1(bitext, n_iter)
    assert ibm.MIN_PROB == 1e-12

    t = np.asarray(result.params["t"])
    e_id = {w: i for i, w in enumerate(c["src_vocab"])}  # None -> 0
    f_id = {w: i for i, w in enumerate(c["tgt_vocab"])}
    cooccur = {(f, e) for en, de in pairs for f in de for e in [None, *en]}
    ours = np.array([t[e_id[e], f_id[f]] for f, e in sorted(cooccur, key=str)])
    theirs = np.array([ibm.translation_table[f][e] for f, e in sorted(cooccur, key=str)])
    assert theirs.min() > 1e-6  # nowhere near nltk's floor
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(t.sum(1), 1.0)
    mask = np.zeros_like(t, bool)
    for f, e in cooccur:
        mask[e_id[e], f_id[f]] = True
    assert np.all(t[~mask] < 1e-12)  # 0, up to the round trip through unconstrained space
    # a spot check of the learnt dictionary
    assert c["tgt_vocab"][int(np.argmax(t[e_id["book"]]))] == "buch"

    # Viterbi alignment at the final table: each target word's most probable source word
    # (nltk: None for NULL, else the source index; compared as words, since ties between two
    # positions of the same source word are broken differently)
    best = np.asarray(result.most_probable["a"])
    for n, (sent, (en, de)) in enumerate(zip(bitext, pairs)):
        theirs_words = {j: (None if i is None else en[i]) for j, i in sent.alignment}
        for j in range(len(de)):
            i = int(best[n, j])
            assert (None if i == 0 else en[i - 1]) == theirs_words[j], (n, j)
