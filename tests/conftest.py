"""Shared test setup: the repository root on sys.path, two threads, fixed seeds; checks shared by test files."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and the 2 shared cores stay usable (pytestmark of the files that want it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def check_decoder_cache(model, ids, mask, dec, vocab_size, tol=1e-5):
    """An encoder-decoder's (BART's, T5's) cached decoding equals its full forward: in a chunk, a token at a time and
    a chunk after a past; the cross keys / values come from the cache, not the encoder states; a beam reorder moves
    the self- and cross-attention caches with the rows."""
    def max_diff(a, b):
        return (a - b).abs().max().item()
    with torch.no_grad():
        memory, memory_mask = model.encode(ids, mask)
        full = model.decode(dec, memory, memory_mask)
        cache = model.new_cache()
        steps = [model.decode(dec[:, :3], memory, memory_mask, cache)]  # a first chunk
        steps += [model.decode(dec[:, t:t + 1], memory, memory_mask, cache) for t in range(3, 6)]  # one at a time
        steps.append(model.decode(dec[:, 6:], memory, memory_mask, cache))  # a chunk after a past
        assert cache.length == dec.shape[1] and len(cache.cross_k) == len(model.decoder.blocks)
        assert max_diff(torch.cat(steps, dim=1), full) <= tol
        stale = model.decode(dec[:, :1], torch.zeros_like(memory), memory_mask, cache)  # the encoder states unused
        continued = model.decode(torch.cat([dec, dec[:, :1]], dim=1), memory, memory_mask)[:, -1:]
        assert max_diff(stale, continued) <= tol
        order = torch.tensor([1, 1, 0])  # beam search: rows [1, 1, 0] continue
        cache.reorder(order)
        nxt = torch.randint(0, vocab_size, (3, 1))
        step = model.decode(nxt, memory[order], memory_mask[order], cache)
        want = model.decode(torch.cat([dec[order], dec[order][:, :1], nxt], dim=1), memory[order], memory_mask[order])
    assert max_diff(step, want[:, -1:]) <= tol
