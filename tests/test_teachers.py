"""Teacher pool: hidden-state contract, rebuilt logits, ordering and switching, residency, compatibility."""

import gc
import weakref
from pathlib import Path

import pytest
import torch

from pluribus.errors import PluribusError
from pluribus.models import add_lora, load, render_prompt, response_logits, save
from pluribus.models.tokenizer import build_char_tokenizer
from pluribus.teachers import TeacherPool, TeacherSpec, check_compatible, response_hidden_states
from pluribus.teachers import pool as pool_module

DOMAINS = ["add", "max", "sort", "reverse"]


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def make_adapter(base_path, out, seed):
    """A LoRA teacher over `base_path` that differs from the base (lora_B is zero at init)."""
    model, tok = load(base_path)
    model = add_lora(model, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return save(model, tok, out)


def make_full(base_path, out, seed):
    """A full-weight teacher: the base with every weight perturbed."""
    model, tok = load(base_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return save(model, tok, out)


@pytest.fixture(scope="module")
def teacher_dirs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    adapters = [make_adapter(tiny_llama, root / f"lora-{d}", seed=i) for i, d in enumerate(DOMAINS)]
    fulls = [make_full(tiny_llama, root / f"full-{d}", seed=10 + i) for i, d in enumerate(DOMAINS[:3])]
    return adapters, fulls


def batch(tok, domains, seed=0, T=7):
    """Prompts per domain and random responses of varying length (padding included)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [render_prompt(tok, [{"role": "user", "content": f"{d} {i} 31 4"[: 6 + i % 5]}])
               for i, d in enumerate(domains)]
    B = len(domains)
    ids = torch.randint(7, len(tok), (B, T), generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None] < lengths[:, None]
    ids[~mask] = tok.pad_token_id
    return prompts, ids, mask


def spec(name, path, domains, weight=1.0):
    return TeacherSpec(name, path, tuple(domains), weight)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_decoder_output_is_final_norm_hidden_state_and_head_gives_logits(fixture, request):
    model, tok = load(request.getfixturevalue(fixture), trainable=False)
    model.eval()
    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": "sort 3 1 2"}])])
    out = model(input_ids=ids, output_hidden_states=True)
    decoder_h = model.get_decoder()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out.hidden_states[-1], decoder_h, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.lm_head(decoder_h), out.logits, rtol=0, atol=1e-5)


def test_rebuilt_logits_equal_each_teachers_own_logits(tiny_llama, teacher_dirs):
    adapters, fulls = teacher_dirs
    _, tok = load(tiny_llama)
    specs = [spec("add", adapters[0], ["add"]), spec("max", adapters[1], ["max"]),
             spec("sort", fulls[2], ["sort"]), spec("reverse", adapters[3], ["reverse"])]
    pool = TeacherPool(specs, tok, vocab_size=len(tok))
    domains = ["reverse", "add", "sort", "max", "add", "sort"]
    index = pool.route(domains)
    order = pool.order(index)
    prompts, ids, mask = batch(tok, [domains[i] for i in order])
    states = pool.teacher_states(prompts, ids, mask, [index[i] for i in order], tok.pad_token_id)
    assert [g.teacher for g in states.groups] == [0, 1, 2, 3]
    assert states.groups[2].head.weight_file is not None  # the full teacher's head is read from disk
    for group in states.groups:
        weight, bias = group.head.load()
        rebuilt = group.hidden_N_D @ weight.T + (0 if bias is None else bias)
        teacher, _ = load(specs[group.teacher].path, trainable=False)
        rows = [b for b, i in enumerate(order) if index[i] == group.teacher]
        own = response_logits(teacher.eval(), [prompts[b] for b in rows], ids[rows], mask[rows],
                              tok.pad_token_id)[mask[rows]]
        assert rebuilt.shape == own.shape and rebuilt.shape[0] == group.rows.stop - group.rows.start
        torch.testing.assert_close(rebuilt, own, rtol=0, atol=1e-5)
    assert states.teacher_index_N.tolist() == sorted(states.teacher_index_N.tolist())


def test_samples_ordered_by_teacher_and_each_adapter_switched_once(tiny_llama, teacher_dirs, monkeypatch):
    from peft import PeftModel

    adapters, _ = teacher_dirs
    _, tok = load(tiny_llama)
    calls = []
    original = PeftModel.set_adapter
    monkeypatch.setattr(PeftModel, "set_adapter", lambda self, name, **kw: (calls.append(name), original(self, name, **kw))[1])
    loads = []
    load_model = pool_module._load_model
    monkeypatch.setattr(pool_module, "_load_model", lambda path, dtype: (loads.append(path), load_model(path, dtype))[1])
    # One forward per teacher (the path models the lean forward does not cover take); batched: see below.
    pool = TeacherPool([spec(d, a, [d]) for d, a in zip(DOMAINS, adapters)], tok, batch_adapters=False)
    domains = ["sort", "add", "reverse", "sort", "max", "add", "reverse", "max"]
    index = pool.route(domains)
    order = pool.order(index)
    assert [index[i] for i in order] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [domains[i] for i in order] == ["add", "add", "max", "max", "sort", "sort", "reverse", "reverse"]
    prompts, ids, mask = batch(tok, [domains[i] for i in order])
    # Loading activates the first adapter; the next batch starts with the one left active.
    for expected in (["t1", "t2", "t3"], ["t0", "t1", "t2"]):
        calls.clear()
        pool.teacher_states(prompts, ids, mask, [index[i] for i in order], tok.pad_token_id)
        assert calls == expected
    assert len(loads) == 1 and pool.loads == 1  # one base, four adapters, loaded once for both batches
    with pytest.raises(PluribusError, match="ordered by teacher"):
        pool.teacher_states(prompts, ids, mask, [3, 0, 0, 1, 1, 2, 2, 3], tok.pad_token_id)


def test_one_full_weight_teacher_resident_at_a_time(tiny_llama, teacher_dirs, monkeypatch):
    _, fulls = teacher_dirs
    _, tok = load(tiny_llama)
    alive = []
    load_model = pool_module._load_model

    def watched_load(path, dtype):  # the pool frees the previous teacher before it loads
        assert all(ref() is None for ref in alive), "a previous teacher is still in memory at the next load"
        model = load_model(path, dtype)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(pool_module, "_load_model", watched_load)
    pool = TeacherPool([spec(d, f, [d]) for d, f in zip(DOMAINS, fulls)], tok)
    domains = ["sort", "add", "max", "add"]
    index = pool.route(domains)
    order = pool.order(index)
    prompts, ids, mask = batch(tok, [domains[i] for i in order])
    states = pool.teacher_states(prompts, ids, mask, [index[i] for i in order], tok.pad_token_id)
    assert pool.loads == 3 and len(alive) == 3
    # The cache holds hidden states and disk handles only: nothing keeps a freed teacher alive.
    gc.collect()
    assert [ref() is None for ref in alive] == [True, True, False]
    pool.teacher_states(prompts, ids, mask, [index[i] for i in order], tok.pad_token_id)
    assert pool.loads == 5  # the resident teacher goes first: two loads, not three
    pool.release()
    del states
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_full_weight_teachers_that_fit_the_budget_stay_resident(tiny_llama, teacher_dirs):
    _, fulls = teacher_dirs
    _, tok = load(tiny_llama)
    one = pool_module._unit_file_bytes(pool_module._Unit(Path(fulls[0])))
    domains = ["sort", "add", "max", "add"]
    for budget, loads_after_two in ((3 * one, 3), (2 * one, 4)):  # all fit; two fit: the resident two go first, one load
        pool = TeacherPool([spec(d, f, [d]) for d, f in zip(DOMAINS, fulls)], tok, resident_budget_bytes=budget)
        index = pool.route(domains)
        order = pool.order(index)
        prompts, ids, mask = batch(tok, [domains[i] for i in order])
        first = pool.teacher_states(prompts, ids, mask, [index[i] for i in order], tok.pad_token_id)
        assert pool.loads == 3 and pool.resident_bytes <= budget
        second = pool.teacher_states(prompts, ids, mask, [index[i] for i in order], tok.pad_token_id)
        assert pool.loads == loads_after_two
        for a, b in zip(first.groups, second.groups):  # residency changes nothing that is computed
            torch.testing.assert_close(a.hidden_N_D, b.hidden_N_D, rtol=0, atol=0)
        pool.release()
        assert pool.resident_bytes == 0


def test_route_refuses_a_domain_without_teacher(tiny_llama, teacher_dirs):
    adapters, _ = teacher_dirs
    _, tok = load(tiny_llama)
    pool = TeacherPool([spec("add", adapters[0], ["add"])], tok)
    with pytest.raises(PluribusError, match="forgotten") as err:
        pool.route(["add", "sort"])
    assert "\n" not in str(err.value) and "sort" in str(err.value)
    with pytest.raises(PluribusError, match="two teachers"):
        TeacherPool([spec("a", adapters[0], ["add"]), spec("b", adapters[1], ["add"])], tok)


def _one_line_error(student, teacher, match, **kw):
    with pytest.raises(PluribusError, match=match) as err:
        check_compatible(student, teacher, **kw)
    assert "\n" not in str(err.value)


def test_compatibility_errors_are_one_clear_line():
    student = build_char_tokenizer()
    check_compatible(student, build_char_tokenizer())  # the same tokenizer passes

    bigger = build_char_tokenizer()
    bigger.add_tokens(["<|tool|>"])
    _one_line_error(student, bigger, "vocabulary sizes differ")

    from tokenizers import Tokenizer, models

    from pluribus.models.tokenizer import CHARS, SPECIALS
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, two ids swapped
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    core.add_special_tokens(SPECIALS)
    from transformers import PreTrainedTokenizerFast
    swapped = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|eos|>",
                                      pad_token="<|pad|>", unk_token="<|unk|>",
                                      additional_special_tokens=SPECIALS[4:])
    swapped.chat_template = student.chat_template
    _one_line_error(student, swapped, "vocabularies differ: token 'a'")

    other_eos = build_char_tokenizer()
    other_eos.eos_token = "<|unk|>"
    _one_line_error(student, other_eos, "EOS differs")
    check_compatible(student, other_eos, allow_eos_mismatch=True)  # allowed on request

    other_template = build_char_tokenizer()
    other_template.chat_template = student.chat_template.replace("<|assistant|>{% endif %}", "<|assistant|>\n{% endif %}")
    _one_line_error(student, other_template, "chat templates render a probe conversation differently")

    no_template = build_char_tokenizer()
    no_template.chat_template = None
    _one_line_error(student, no_template, "no chat template")


def test_pool_checks_teachers_when_built(tiny_llama, teacher_dirs, tmp_path):
    adapters, _ = teacher_dirs
    model, tok = load(adapters[0])
    tok.chat_template = tok.chat_template.replace("<|user|>", "<|user|> ")
    save(model, tok, tmp_path / "odd")
    _, student_tok = load(tiny_llama)
    with pytest.raises(PluribusError, match="teacher 'odd'.*chat templates"):
        TeacherPool([spec("odd", tmp_path / "odd", ["add"])], student_tok)


def test_response_hidden_states_rows_follow_the_mask(tiny_llama):
    model, tok = load(tiny_llama, trainable=False)
    prompts, ids, mask = batch(tok, ["add", "max", "sort"], seed=3)
    hidden = response_hidden_states(model.eval(), prompts, ids, mask, tok.pad_token_id)
    assert hidden.shape == (int(mask.sum()), model.config.hidden_size)
    one = response_hidden_states(model, prompts[1:2], ids[1:2], mask[1:2], tok.pad_token_id)
    start = int(mask[0].sum())
    torch.testing.assert_close(hidden[start:start + one.shape[0]], one, rtol=0, atol=1e-5)


def test_adapter_teachers_of_one_base_run_in_one_forward(tiny_llama, teacher_dirs):
    """Batched (the default): the states of one-teacher-at-a-time, without switching adapters once each has been
    checked on first use."""
    adapters, fulls = teacher_dirs
    _, tok = load(tiny_llama)
    specs = [spec("add", adapters[0], ["add"]), spec("max", adapters[1], ["max"]),
             spec("sort", fulls[2], ["sort"]), spec("reverse", adapters[3], ["reverse"])]
    batched, alone = TeacherPool(specs, tok), TeacherPool(specs, tok, batch_adapters=False)
    domains = ["reverse", "add", "sort", "max", "add", "sort", "reverse"]
    index = batched.route(domains)
    order = batched.order(index)
    prompts, ids, mask = batch(tok, [domains[i] for i in order])
    teacher_index = [index[i] for i in order]
    for _ in range(2):
        together = batched.teacher_states(prompts, ids, mask, teacher_index, tok.pad_token_id)
        one_by_one = alone.teacher_states(prompts, ids, mask, teacher_index, tok.pad_token_id)
        assert [g.teacher for g in together.groups] == [g.teacher for g in one_by_one.groups] == [0, 1, 2, 3]
        for a, b in zip(together.groups, one_by_one.groups):
            assert a.rows == b.rows
            torch.testing.assert_close(a.hidden_N_D, b.hidden_N_D, rtol=0, atol=1e-5)
    assert batched.adapter_switches == 2  # t1 and t3 checked once each (t0 is active when the base loads)
    assert alone.adapter_switches > batched.adapter_switches
    assert batched.loads == alone.loads  # the same schedule of units


def test_prefetch_reads_the_next_teacher_ahead_and_computes_the_same(tiny_llama, teacher_dirs, monkeypatch):
    """V4's asynchronous loading: with `prefetch`, the files of every load but the very first are read ahead (the
    next unit of the batch, then the one the next batch loads first), the hidden states are the synchronous pool's
    to the bit, and a model is still built only after the previous one is freed (a read ahead holds no model)."""
    _, fulls = teacher_dirs
    _, tok = load(tiny_llama)
    alive, reads = [], []
    load_model, read_files = pool_module._load_model, pool_module._read_files

    def watched_load(path, dtype):
        assert all(ref() is None for ref in alive), "a previous teacher is still in memory at the next load"
        model = load_model(path, dtype)
        alive.append(weakref.ref(model))
        return model

    def watched_read(files):  # the folders read, in order
        reads.append(list(dict.fromkeys(Path(f).parent.name for f in files)))
        return read_files(files)

    monkeypatch.setattr(pool_module, "_load_model", watched_load)
    monkeypatch.setattr(pool_module, "_read_files", watched_read)
    domains = ["sort", "add", "max", "add"]
    results = {}
    for prefetch in (False, True):
        alive.clear(), reads.clear()
        pool = TeacherPool([spec(d, f, [d]) for d, f in zip(DOMAINS, fulls)], tok, prefetch=prefetch)
        index = pool.route(domains)
        order = pool.order(index)
        prompts, ids, mask = batch(tok, [domains[i] for i in order])
        steps = [pool.teacher_states(prompts, ids, mask, [index[i] for i in order], tok.pad_token_id)
                 for _ in range(3)]
        assert pool.loads == 3 + 2 + 2  # residency is unchanged: the resident teacher goes first
        assert pool.loads_ahead == (6 if prefetch else 0)
        # batch 1 loads add, max, sort; then sort (resident), add, max; then max (resident), add, sort
        assert reads == ([["full-max"], ["full-sort"], ["full-add"], ["full-max"], ["full-add"], ["full-sort"],
                          ["full-add"]] if prefetch else [])
        results[prefetch] = [g.hidden_N_D for states in steps for g in states.groups]
        pool.release()
        assert pool._loader is None and pool._reading is None
        del steps
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    unit = pool_module._Unit(Path(fulls[0]))
    assert pool_module._read_files(pool_module._unit_files(unit)) == pool_module._unit_file_bytes(unit) > 0


def test_an_error_reading_ahead_is_raised_at_that_teachers_turn(tiny_llama, teacher_dirs, monkeypatch):
    _, fulls = teacher_dirs
    _, tok = load(tiny_llama)

    def unreadable(files):
        raise OSError(f"cannot read {Path(files[0]).parent.name}")

    monkeypatch.setattr(pool_module, "_read_files", unreadable)
    pool = TeacherPool([spec(d, f, [d]) for d, f in zip(DOMAINS, fulls)], tok, prefetch=True)
    domains = ["add", "max"]
    index = pool.route(domains)
    prompts, ids, mask = batch(tok, domains)
    with pytest.raises(OSError, match="cannot read full-max"):
        pool.teacher_states(prompts, ids, mask, index, tok.pad_token_id)
    pool.release()


def test_prefetch_reads_a_lora_units_base_and_adapters_ahead(tiny_llama, teacher_dirs, monkeypatch):
    """Full-weight teachers and LoRA teachers over one base (a unit of its own, reached once per adapter checked on
    first use): each unit's files are read ahead once, base and adapters together, and nothing computed changes."""
    adapters, fulls = teacher_dirs
    _, tok = load(tiny_llama)
    reads = []
    read_files = pool_module._read_files

    def watched_read(files):  # the folders read, in order
        reads.append(list(dict.fromkeys(Path(f).parent.name for f in files)))
        return read_files(files)

    monkeypatch.setattr(pool_module, "_read_files", watched_read)
    specs = [spec("add", adapters[0], ["add"]), spec("max", fulls[1], ["max"]), spec("sort", fulls[2], ["sort"]),
             spec("reverse", adapters[3], ["reverse"])]
    domains = ["add", "max", "sort", "reverse"]
    states = {}
    for prefetch in (False, True):
        reads.clear()
        pool = TeacherPool(specs, tok, prefetch=prefetch)
        index = pool.route(domains)
        order = pool.order(index)
        prompts, ids, mask = batch(tok, [domains[i] for i in order])
        states[prefetch] = pool.teacher_states(prompts, ids, mask, [index[i] for i in order], tok.pad_token_id)
        assert pool.loads == 3 and pool.loads_ahead == (2 if prefetch else 0)
        pool.release()
    assert reads[0] == ["full-sort"] and reads[1][1:] == ["lora-add", "lora-reverse"] and reads[2] == ["full-max"]
    assert len(reads) == 3
    for a, b in zip(states[False].groups, states[True].groups):
        torch.testing.assert_close(a.hidden_N_D, b.hidden_N_D, rtol=0, atol=0)


def test_an_evicted_teacher_is_collected_only_when_a_reference_cycle_keeps_it(tiny_llama, teacher_dirs, monkeypatch):
    """A full collection costs ~0.2 s with transformers loaded, and one teacher at a time evicts one at every load:
    a plain model goes with its last reference, so no collection runs; a peft unit (reference cycles) is still
    freed by one."""
    adapters, fulls = teacher_dirs
    _, tok = load(tiny_llama)
    collections = []
    collect = pool_module.gc.collect
    monkeypatch.setattr(pool_module.gc, "collect", lambda *a: (collections.append(1), collect(*a))[1])
    alive = []
    load_model = pool_module._load_model
    monkeypatch.setattr(pool_module, "_load_model",
                        lambda path, dtype: (lambda m: (alive.append(weakref.ref(m)), m)[1])(load_model(path, dtype)))
    pool = TeacherPool([spec(d, f, [d]) for d, f in zip(DOMAINS, fulls)], tok)
    domains = ["sort", "add", "max"]
    index = pool.route(domains)
    order = pool.order(index)
    prompts, ids, mask = batch(tok, [domains[i] for i in order])
    for _ in range(2):
        pool.teacher_states(prompts, ids, mask, [index[i] for i in order], tok.pad_token_id)
    assert pool.loads == 5 and collections == []
    assert [ref() is None for ref in alive] == [True] * 4 + [False]
    pool.release()
    assert alive[-1]() is None and collections == []
    lora = TeacherPool([spec("add", adapters[0], ["add"]), spec("max", adapters[1], ["max"])], tok)
    prompts, ids, mask = batch(tok, ["add", "max"])
    lora.teacher_states(prompts, ids, mask, lora.route(["add", "max"]), tok.pad_token_id)
    unit = weakref.ref(next(iter(lora._resident.values())))
    lora.release()
    assert unit() is None
