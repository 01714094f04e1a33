"""Teachers loaded one at a time, their files read ahead or not: `python -m pluribus.bench.prefetch [--cold]`.

Full-weight teachers (random Llamas of `--size`, saved once under `--root`), one resident at a time (the pool's
default budget), `teacher_states` on a batch that visits every teacher, timed step by step, with `prefetch` off and
on in alternating pool instances of one process. `--cold` empties the page cache before each step (root only:
/proc/sys/vm/drop_caches), the case of teachers too large to stay cached, where reading their files is part of every
load. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8, help="the tiny preset's size dial (8: 13.7M parameters)")
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="empty the page cache before each step (root)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/pluribus-prefetch-bench"))
    args = parser.parse_args(argv)
    if args.cold and not os.access(DROP_CACHES, os.W_OK):
        raise SystemExit(f"--cold needs write access to {DROP_CACHES} (run as root)")
    from pluribus.models import count_parameters, load_causal_lm, random_causal_lm, render_prompt, save, tiny_config
    from pluribus.models.tokenizer import build_char_tokenizer
    from pluribus.teachers import TeacherPool, TeacherSpec

    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    config = tiny_config(args.size, len(tokenizer))
    folders = [args.root / f"size{args.size}" / f"teacher-{e}" for e in range(args.teachers)]
    for e, folder in enumerate(folders):
        if not (folder / "config.json").is_file():
            torch.manual_seed(e)
            save(random_causal_lm(config), tokenizer, folder, {"bench": "prefetch"})
    per_teacher = 8
    B = per_teacher * args.teachers
    generator = torch.Generator().manual_seed(0)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": f"add {i} 31"}]) for i in range(B)]
    response_ids = torch.randint(7, len(tokenizer), (B, 32), generator=generator)
    mask = torch.ones(B, 32, dtype=torch.long)
    index = [b // per_teacher for b in range(B)]
    specs = [TeacherSpec(f"t{e}", folder, (f"d{e}",)) for e, folder in enumerate(folders)]
    steps: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for prefetch in ((False, True) if r % 2 == 0 else (True, False)):
            pool = TeacherPool(specs, tokenizer, prefetch=prefetch)
            for step in range(args.steps):
                if args.cold:
                    os.sync()
                    DROP_CACHES.write_text("1")
                start = time.perf_counter()
                pool.teacher_states(prompts, response_ids, mask, index, tokenizer.pad_token_id)
                if step:  # the first step loads every teacher, nothing read ahead yet
                    steps[prefetch].append(time.perf_counter() - start)
            pool.release()
    parameters = count_parameters(load_causal_lm(folders[0]))
    off, on = (statistics.median(steps[p]) for p in (False, True))
    print(f"{args.teachers} full-weight teachers of {parameters / 1e6:.1f}M parameters, one resident, "
          f"{'cold' if args.cold else 'warm'} page cache, {len(steps[False])} steps a side")
    print(f"teacher_states median: {off:.3f} s synchronous, {on:.3f} s reading ahead ({on / off:.2f}x)")


if __name__ == "__main__":
    main()
