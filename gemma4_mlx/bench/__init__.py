"""Head-to-head benchmark: this package's Gemma 4 against stock mlx-lm's ``gemma4_text``.

Both models live in one process with *identical* weights (the same ``mx.array`` objects: stock's
parameters are replaced by ours with ``Module.update``), go through mlx-lm's
:func:`mlx_lm.generate.generate_step` (greedy, with its async-eval pipelining; ours as its
``stream_generate`` runs it, :func:`gemma4_mlx.prompt_fill.generate_steps`: the prompt's chunks
written by the cache-writing layers alone), and are measured alternately, run by run (ours,
stock, ours, stock ...), after a warm-up of both.

Per prompt length the harness reports the medians of

* time to first token (TTFT: prefill of the prompt plus the first sampled token) and prefill
  tokens/s (= prompt length / TTFT, mlx-lm's ``prompt_tps``),
* decode tokens/s of ``decode_tokens`` tokens generated after that prompt (mlx-lm's
  ``generation_tps``: tokens after the first / time after the first),
* peak memory (``mx.get_peak_memory``, reset before each run; the shared weights are resident for
  both sides, so the difference between the sides is activations, caches and temporaries),

and the ratio ours/stock (>1 is better for tok/s, <1 is better for TTFT and memory).

Before timing, a greedy token check generates ``check_tokens`` tokens with each model from the
same prompt and reports the first divergence (float32 should match exactly; bf16/fp16 may drift).

One module per concern, each imported by what it is:

* :mod:`.settings`: :class:`~.settings.BenchSettings` and its defaults per device;
* :mod:`.pair`: ours and stock built with the very same weight arrays;
* :mod:`.measure`: the token check and one timed run of one side;
* :mod:`.reference`: the HF transformers (PyTorch) line, same weights;
* :mod:`.environment`: device, versions, commit and command of a run;
* :mod:`.run`: the whole comparison (:func:`~.run.run_benchmark`) and the kernel micro-benchmarks;
* :mod:`.report`: the results as a table, Markdown, PNG and JSON.
* :mod:`.e2e`, :mod:`.e2e_child`, :mod:`.e2e_report`: ``compare --e2e``, both generate commands in
  fresh processes (the runs, the shim around each command, the results).

Used by ``gemma4-mlx compare`` and ``python -m bench.compare``.
"""
