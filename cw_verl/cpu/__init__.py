"""CPU support for verl: its real trainer (main_ppo, Ray, vLLM) and its actor path on gloo ranks, without GPUs.

verl 0.9.1 ships no CPU platform. :mod:`cw_verl.cpu.platform` adds one; :mod:`cw_verl.cpu.activation`
turns it and the CPU shims (:mod:`cw_verl.cpu.verl_shims` for the trainer, :mod:`cw_verl.cpu.megatron`
with :mod:`cw_verl.cpu.megatron_layers` for verl's Megatron engine, and vLLM's plugin
:mod:`cw_verl.cpu.vllm_plugin`) on in every process of a run when ``VERL_PLATFORM=cpu``, and never
otherwise; :mod:`cw_verl.cpu.supervise` bounds a run's waits and ends all its processes;
:mod:`cw_verl.cpu.sampler` is verl's replay buffers (sync, async) with a short poll for tiny runs. Without Ray,
:mod:`cw_verl.cpu.harness` builds verl's actor worker (FSDP2 or Megatron) and drives it the way verl's
trainer does and :mod:`cw_verl.cpu.launch` starts the gloo ranks; :mod:`cw_verl.cpu.tiny_model` builds a
tiny Llama and a character tokenizer locally. It is switched on by its own ``verl.plugins`` entry point
(:mod:`cw_verl.cpu.verl_plugin`), so the core never imports it. None of this is used on a GPU cluster.
"""
