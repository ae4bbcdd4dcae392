"""Model analysis: parameter counts, FLOPs (compiled and analytic), speed, plots."""

from ponder.analysis.flops import compiled_flops, cost_of, vit_flops, vit_macs
from ponder.analysis import plots
from ponder.analysis.params import count_params
from ponder.analysis.timing import (hlo_module_name, hlo_op_info, latency_and_throughput,
                                    matmul_peak_flops, measure, measure_interleaved,
                                    op_profile)
