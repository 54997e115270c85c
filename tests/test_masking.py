"""BERT masking: rates, exclusivity of outcomes, specials, determinism, purity."""

import pytest
import torch

from maskedlm import mask_tokens
from maskedlm.masking import IGNORE_INDEX, random_tokens

V = 1000
SPECIALS = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID = 4


def batch(n_rows=1024, T=1024, seed=0):
    """~1M tokens: ordinary ids with [CLS] at the start, [SEP] at the end and a padded tail per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (n_rows, T), generator=g)
    ids[:, 0] = 2
    ids[:, -1] = 3
    ids[:, -100:-1] = 0  # padding before the final [SEP] (position of padding does not matter)
    return ids


def run(ids, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=V, special_ids=SPECIALS, generator=g, **kw)


def test_rates_over_a_million_tokens():
    ids = batch()
    assert ids.numel() >= 1_000_000
    inputs, labels = run(ids)
    maskable = ~torch.isin(ids, torch.tensor(SPECIALS))
    selected = labels != IGNORE_INDEX
    n_sel = selected.sum().item()
    # Binomial std of the selection rate is ~3.7e-4 here: bounds of +-0.002 are > 5 sigma.
    assert abs(n_sel / maskable.sum().item() - 0.15) < 0.002
    became_mask = (inputs == MASK_ID) & selected
    unchanged = (inputs == ids) & selected
    changed_other = selected & (inputs != ids) & (inputs != MASK_ID)
    # Of ~137k selected, std of each fraction is < 1e-3.
    assert abs(became_mask.sum().item() / n_sel - 0.8) < 0.005
    # "unchanged" includes random draws that hit the original id (1/995 of the random 10%).
    assert abs(unchanged.sum().item() / n_sel - 0.1) < 0.005
    assert abs(changed_other.sum().item() / n_sel - 0.1 * (1 - 1 / (V - 5))) < 0.005
    # Outside the selection nothing changes.
    assert torch.equal(inputs[~selected], ids[~selected])


def test_labels_are_originals_at_selected_positions_only():
    ids = batch(64, 256)
    inputs, labels = run(ids)
    sel = labels != IGNORE_INDEX
    assert torch.equal(labels[sel], ids[sel])
    assert (labels[~sel] == IGNORE_INDEX).all()
    assert labels.dtype == torch.long


def test_specials_never_selected_or_changed():
    ids = batch(256, 512)
    inputs, labels = run(ids, mask_prob=0.9)
    special = torch.isin(ids, torch.tensor(SPECIALS))
    assert (labels[special] == IGNORE_INDEX).all()
    assert torch.equal(inputs[special], ids[special])


def test_random_replacements_are_uniform_over_non_special_vocabulary():
    g = torch.Generator().manual_seed(0)
    specials = (0, 100, 101, 102, 103)  # scattered, like bert-base's vocab.txt
    draws = random_tokens((500_000,), vocab_size=200, special_ids=specials, generator=g)
    counts = torch.bincount(draws, minlength=200)
    assert counts[list(specials)].sum() == 0
    assert draws.min() >= 0 and draws.max() < 200
    others = torch.tensor([c for i, c in enumerate(counts.tolist()) if i not in specials], dtype=torch.float)
    expected = 500_000 / 195
    chi2 = (((others - expected) ** 2) / expected).sum().item()
    assert chi2 < 195 + 6 * (2 * 194) ** 0.5  # well inside the chi-square(194) bulk


def test_random_replacements_never_special_in_mask_tokens():
    ids = batch(256, 256)
    inputs, labels = run(ids, mask_token_frac=0.0, random_token_frac=1.0)
    sel = labels != IGNORE_INDEX
    assert not torch.isin(inputs[sel], torch.tensor(SPECIALS)).any()


def test_deterministic_given_generator_and_different_across_seeds():
    ids = batch(32, 128)
    a, la = run(ids, seed=7)
    b, lb = run(ids, seed=7)
    c, lc = run(ids, seed=8)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)


def test_input_is_not_modified():
    ids = batch(32, 128)
    before = ids.clone()
    run(ids)
    assert torch.equal(ids, before)


@pytest.mark.parametrize("split", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, 0.5)])
def test_configured_split_is_respected(split):
    ids = batch(128, 256)
    inputs, labels = run(ids, mask_token_frac=split[0], random_token_frac=split[1])
    sel = labels != IGNORE_INDEX
    frac_mask = ((inputs == MASK_ID) & sel).sum().item() / sel.sum().item()
    assert abs(frac_mask - split[0]) < 0.02
    if split == (0.0, 0.0):
        assert torch.equal(inputs, ids)


def test_works_with_narrow_integer_dtypes():
    ids = batch(8, 64).to(torch.int32)
    inputs, labels = run(ids)
    assert inputs.dtype == torch.int32 and labels.dtype == torch.long
