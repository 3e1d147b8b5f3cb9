"""Stand-in for mpi4py (test harness): the fork only calls ``MPI.COMM_WORLD.Barrier()``."""
