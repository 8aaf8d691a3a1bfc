"""moe_mpi: Mixture-of-Experts inference with one expert of one MoE layer per MPI rank."""
__version__ = "0.1.0"
