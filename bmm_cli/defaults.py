"""Default values of the merge parameters.

λ has no single default: without ``--params``/``--lam`` each module's λ is its type-II maximum-likelihood λ
(:mod:`bmm_cli.default_params`, no validation data). ``DEFAULT_LAM`` is the λ used where the evidence cannot pick
one: when no module of a model has an interior evidence maximum (:func:`bmm_cli.evidence.fill_degenerate`), and
for a block-group of a search space that holds no module. λ is relative (``Ĝ = G/m``, ``m = tr(G)/d_in``); on the
MiniLM benchmark the validation surface is flat within its noise over λ ∈ [1e-3, 1], and 0.03 sits at its best
(bench/sweep_defaults.py → bench/results/defaults.json).

s = 1 is the unextrapolated MAP solution, the one choice that does not have to be fitted to a benchmark. On
MiniLM s ∈ {1.0, 1.15, 1.3} are within the validation noise (±0.016); on the decoder (SmolLM2-135M,
bench/run_decoder.sh) s = 1.15 costs 0.025-0.03 nat of validation loss against s = 1 and s = 1.3 costs 0.065, at
λ = 0.03 and at the evidence λ alike (bench/results/decoder-scale-*.json).

``FREE_LAM_FACTOR`` multiplies the evidence λ of every module for the data-free statistics (``--gram free``) before
the per-layer means. The data-free evidence counts the ``N = T·d_out`` rows of the task vectors as independent
observations per output row, but the rows of a fine-tuned update are strongly correlated (each task vector has a
low effective rank), so N overstates the information and the evidence λ comes out too small: the merge trusts the
task vectors' own directions more than they warrant. A factor on λ is the same correction as a smaller N, applied
uniformly. On the decoder benchmark (SmolLM2-135M, four experts; bench/evidence_study.py on the validation windows,
bench/results/evidence_study.json) factors 3, 10 and 30 all beat factor 1 for the anchors TA, TIES, TSV and ISO-CTS,
and 10 is the best or within noise of the best for each. On the test windows of its 50-step experts
(bench/results/decoder.json, rows bmm-free+x1-*) factor 10 gains over factor 1 with TSV (+0.017 ± 0.003 gap closed:
factor 1 leaves the TSV merge at its anchor), ISO-CTS (+0.029 ± 0.004) and TIES (+0.006 ± 0.004), loses with TA
(-0.015 ± 0.005, both factors above the TA anchor), and puts every data-free default above its anchor. On MiniLM
(bench/results/minilm-free-factor.json) factors 10 and 1 are equal within a paired SE of 0.004 for TA, TIES and TSV.

ε = 0.5 weighs the data-free and data-assisted statistics of ``--gram hybrid`` evenly.
"""

DEFAULT_LAM = 0.03
DEFAULT_SCALE = 1.0
DEFAULT_EPS = 0.5
FREE_LAM_FACTOR = 10.0
