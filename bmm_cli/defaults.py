"""Default BMM parameters when no ``--params``/``--lam``/``--scale`` is given (and the first trial of a search).

λ = 0.03 was chosen on the MiniLM benchmark (bench/sweep_defaults.py → bench/results/defaults.json: five MiniLM
experts, TSV anchor, validation split; the surface is flat within its noise over λ ∈ [1e-3, 1]). λ is relative
(``Ĝ = G/m``, ``m = tr(G)/d_in``). A validation-free alternative per module is the type-II maximum-likelihood λ of
bmm_cli/evidence.py; on the decoder benchmark (bench/results/decoder.json) it beats λ = 0.03.

s = 1 (was 1.15): on MiniLM s ∈ {1.0, 1.15, 1.3} were within the validation noise (±0.016), while on the decoder
(SmolLM2-135M, bench/run_decoder.sh) s = 1.15 cost 0.025-0.03 nat of validation loss against s = 1 and s = 1.3
cost 0.065, at λ = 0.03 and at the evidence λ alike (bench/results/decoder-scale-*.json). s = 1 is the
unextrapolated MAP solution, the one choice that does not have to be fitted to a benchmark.
"""

DEFAULT_LAM = 0.03
DEFAULT_SCALE = 1.0
DEFAULT_EPS = 0.5
