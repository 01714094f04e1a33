"""Teachers for on-policy distillation: compatibility, routing, scheduling, cached hidden states, the loss schedule.

- `check_compatible`: refuse a teacher that tokenizes or renders conversations unlike the student.
- `TeacherPool`: domain → teacher, samples ordered by teacher, each teacher run once per batch with
  at most one unit (a shared base with all its LoRA adapters, or one full model) resident; caches
  last-layer hidden states and a handle on each teacher's output head.
- `distill_backward`: Eq. 29 over the cached states, one teacher head loaded at a time.
- `response_hidden_states` / `output_head`: the student side of the same contract.
"""

from pluribus.teachers.compat import PROBE_CONVERSATION, check_compatible
from pluribus.teachers.hidden import check_head_reproduces_logits, output_head, response_hidden_states
from pluribus.teachers.loss import distill_backward
from pluribus.teachers.pool import TeacherGroup, TeacherHead, TeacherPool, TeacherSpec, TeacherStates

__all__ = [
    "PROBE_CONVERSATION",
    "TeacherGroup",
    "TeacherHead",
    "TeacherPool",
    "TeacherSpec",
    "TeacherStates",
    "check_compatible",
    "check_head_reproduces_logits",
    "distill_backward",
    "output_head",
    "response_hidden_states",
]
