"""Smoke test of benchmarks/run.py: its quick path runs in-process on the smallest
setting and writes the JSON that benchmarks/render.py reads. No timing is asserted."""

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import render, run  # noqa: E402

HAS_TORCH = importlib.util.find_spec('torch') is not None
CASE_KEYS = {
  'framework',
  'suite',
  'method',
  'arch',
  'width',
  'batch',
  'dtype',
  'times_s',
  'median_s',
  'first_call_s',
  'images_per_s',
  'memory',
  'load_before',
  'load_after',
}


def test_quick_benchmark_writes_its_schema_and_renders(tmp_path):
  out = tmp_path / 'quick.json'
  results = run.main(
    [
      '--quick',
      '--methods',
      'none',
      '--attack-methods',
      'none',
      '--attacks',
      'pgd7',
      '--inputs',
      'device,host',
      '--width',
      '0.25',
      '--batch',
      '4',
      '--repeats',
      '1',
      '--devices',
      '1',  # This process's JAX has started with one device.
      '--out',
      str(out),
    ]
  )
  saved = json.loads(out.read_text())
  assert saved == json.loads(json.dumps(results)) and saved['failed'] == []
  assert {'cpu', 'usable_cores', 'gpu', 'versions'} <= set(saved['machine'])
  assert {'jax', 'jaxlib', 'flax', 'torch', 'python'} <= set(saved['machine']['versions'])
  cases = saved['cases']
  assert {(c['framework'], c['suite']) for c in cases} == (
    {('jax', 'train'), ('jax', 'attacks')}
    | ({('torch', 'train'), ('torch', 'attacks')} if HAS_TORCH else set())
  )
  for case in cases:
    assert CASE_KEYS <= set(case) and len(case['times_s']) == 1
    assert case['images_per_s'] > 0 and case['memory']['peak_bytes'] > 0
    if case['framework'] == 'jax':
      assert case['compile']['compile_s'] > 0 and case['checks']['host_callbacks'] == 0
      assert case['devices'] == 1
  steps = [c for c in cases if c['framework'] == 'jax' and c['suite'] == 'train']
  assert sorted(c['input'] for c in steps) == ['device', 'host']
  for step in steps:
    assert step['checks']['donated_buffers'] == step['checks']['state_buffers']
    assert step['checks']['transfer_guard'] == (
      'disallow' if step['input'] == 'device' else 'allow'
    )

  markdown = tmp_path / 'BENCHMARKS.md'
  markdown.write_text('# Benchmarks\n\nprose\n')
  for _ in range(2):  # Rendering again replaces the block, keeping the prose.
    render.main(['--results', str(out), '--out', str(markdown)])
  text = markdown.read_text()
  assert text.startswith('# Benchmarks\n\nprose\n') and text.count(render.BEGIN) == 1
  assert 'JAX/PyTorch' in text and 'quick.json' in text


def test_the_profile_counts_convolutions_by_xla_op_name_not_converts():
  """L2P's random numbers run in 'convert' fusions: counting them as convolutions
  overstated its convolution time (the op names below are XLA:CPU's)."""
  from benchmarks import profile_step

  assert profile_step.kind('convolution.495') == 'convolution'
  assert profile_step.kind('convolution-base-dilated.3') == 'convolution'
  assert profile_step.kind('ynn_fusion.12') == 'convolution'
  assert profile_step.kind('convert_element_type_fusion.7') == 'other ops'
  assert profile_step.kind('convert_reduce_fusion') == 'other ops'
  assert profile_step.kind('all-reduce.3') == 'all-reduce'


def test_the_step_programs_hash_ignores_names_and_debug_information_but_not_ops():
  """Two dumps of one program whose values XLA named after different Python functions
  (what compiling L2P first did to vanilla's step) hash the same; another op does not."""
  from benchmarks import step_program

  template = (
    'HloModule jit_step\n\n'
    'ENTRY %main.3 (p: u32[3]) -> u32[3] {{\n'
    '  %p = u32[3]{{0}} parameter(0), metadata={{op_name="{source}"}}\n'
    '  %{name}.1 = u32[3]{{0}} {op}(%p, %p)\n'
    '  ROOT %{name}.2 = u32[3]{{0}} xor(%{name}.1, %p)\n'
    '}}\n\nFileNames\n1 "{source}"\n'
  )
  first = template.format(name='pgd__locals__run', op='add', source='a.py')
  renamed = template.format(name='pgd_noise_keys__locals___lambda_', op='add', source='b.py')
  other_op = template.format(name='pgd__locals__run', op='multiply', source='a.py')
  assert step_program.digest(first) == step_program.digest(renamed)
  assert step_program.digest(first) != step_program.digest(other_op)
  assert 'pgd' not in step_program.canonical_names(step_program.strip_debug_information(first))


def test_the_benchmarked_model_differentiates_convolutions_as_the_command_line_says():
  """`--conv-input-gradient xla` once reached the config but not the model: the cached
  initializer built every network with 'auto', so both options timed one program."""
  from l2p_jax.runtime import sharding

  mesh = sharding.make_mesh(1)
  for option in ('xla', 'transposed_kernel'):
    args = run.parse_args(['--conv-input-gradient', option, '--width', '0.25', '--out', 'x'])
    config = run.args_config(args, 'none', 'resnet8')
    model, _, _ = run.jax_model_and_state(config, mesh)
    assert model.conv_input_gradient == option
