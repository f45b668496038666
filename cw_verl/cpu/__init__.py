"""CPU support for running verl's actor training path without GPUs or Ray (a test and demo aid).

verl 0.9.1 ships no CPU platform. :mod:`cw_verl.cpu.platform` adds one so that verl's own
``TrainingWorker`` / FSDP2 engine / ``ppo_loss`` run on gloo ranks on a laptop or CI box;
:mod:`cw_verl.cpu.megatron` (with :mod:`cw_verl.cpu.megatron_layers`) does the same for verl's Megatron
engine; :mod:`cw_verl.cpu.harness` builds such a worker (FSDP2 or Megatron) and drives it the way verl's
trainer does; :mod:`cw_verl.cpu.launch` starts the ranks; :mod:`cw_verl.cpu.tiny_model` builds a tiny Llama
and a character tokenizer locally; :mod:`cw_verl.cpu.studies` and :mod:`cw_verl.cpu.megatron_study` are the
measurements the tests and benchmarks share. None of this is used on a GPU cluster.
"""
