"""Can a teacher score the student's tokens? Same vocabulary, same special tokens, same chat rendering.

A teacher reads the student's token ids as they are, so any difference in how text becomes ids is a
silent bias: a different vocabulary scores the wrong tokens; a different chat template puts the
teacher in a context it was never trained in; a different EOS teaches the student to end its turn
with a token it does not stop on (the endless repetition users of other OPD tools report).
"""

from __future__ import annotations

from pluribus.errors import PluribusError
from pluribus.models import render_prompt

# Every role, a multi-turn history and the generation prompt: the template's whole surface.
PROBE_CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "add 12 345"},
    {"role": "assistant", "content": "357"},
    {"role": "user", "content": "reverse abc"},
]


def check_compatible(student_tokenizer, teacher_tokenizer, allow_eos_mismatch: bool = False,
                     teacher: str = "teacher") -> None:
    """Raise one `PluribusError` line naming the first difference, or return None when compatible.

    Checked in order: vocabulary size, the vocabulary itself (token → id), pad/bos/unk and the chat
    special tokens, EOS (allowed to differ only with `allow_eos_mismatch`), and the token ids the
    chat template renders for a probe conversation (with an allowed EOS mismatch, the teacher's EOS
    may stand where the student's does).
    """
    s, t = student_tokenizer, teacher_tokenizer
    if len(s) != len(t):
        raise PluribusError(f"{teacher}: vocabulary sizes differ (student {len(s)}, teacher {len(t)}); "
                            "distillation over the full vocabulary needs one vocabulary")
    student_vocab, teacher_vocab = s.get_vocab(), t.get_vocab()
    if student_vocab != teacher_vocab:
        token = next(tok for tok in sorted(student_vocab, key=student_vocab.get)
                     if teacher_vocab.get(tok) != student_vocab[tok])
        raise PluribusError(f"{teacher}: vocabularies differ: token {token!r} is id {student_vocab[token]} in the "
                            f"student and {teacher_vocab.get(token, 'absent')} in the teacher")
    for role in ("pad", "bos", "unk"):
        if (getattr(s, f"{role}_token"), getattr(s, f"{role}_token_id")) != \
                (getattr(t, f"{role}_token"), getattr(t, f"{role}_token_id")):
            raise PluribusError(f"{teacher}: {role} tokens differ (student {_named(s, role)}, teacher {_named(t, role)})")
    eos_differs = (s.eos_token, s.eos_token_id) != (t.eos_token, t.eos_token_id)
    if eos_differs and not allow_eos_mismatch:
        raise PluribusError(f"{teacher}: EOS differs (student {_named(s, 'eos')}, teacher {_named(t, 'eos')}): the "
                            "student would learn to end turns with a token it does not stop on; "
                            "set allow_eos_mismatch to accept it")
    ignore = {s.eos_token, t.eos_token} if eos_differs else set()
    student_specials = set(s.all_special_tokens) - ignore
    teacher_specials = set(t.all_special_tokens) - ignore
    if student_specials != teacher_specials:
        only_student = sorted(student_specials - teacher_specials)
        only_teacher = sorted(teacher_specials - student_specials)
        raise PluribusError(f"{teacher}: special tokens differ (only the student's: {only_student}, "
                            f"only the teacher's: {only_teacher})")
    student_ids = _render(s, "student", teacher)
    teacher_ids = _render(t, "teacher", teacher)
    allowed = {(s.eos_token_id, t.eos_token_id)} if eos_differs else set()
    same = [a == b or (a, b) in allowed for a, b in zip(student_ids, teacher_ids)]
    if len(student_ids) != len(teacher_ids) or not all(same):
        at = same.index(False) if not all(same) else len(same)
        raise PluribusError(f"{teacher}: chat templates render a probe conversation differently (from token {at}: "
                            f"student {s.decode(student_ids[at:at + 8])!r}, teacher {t.decode(teacher_ids[at:at + 8])!r})")


def _named(tokenizer, role: str) -> str:
    return f"{getattr(tokenizer, f'{role}_token')!r} id {getattr(tokenizer, f'{role}_token_id')}"


def _render(tokenizer, whose: str, teacher: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise PluribusError(f"{teacher}: the {whose}'s tokenizer has no chat template")
    try:
        return render_prompt(tokenizer, PROBE_CONVERSATION)
    except Exception:  # some templates refuse a system turn: probe without it
        try:
            return render_prompt(tokenizer, PROBE_CONVERSATION[1:])
        except Exception as e:
            raise PluribusError(f"{teacher}: the {whose}'s chat template cannot render a probe conversation ({e})") from None
