"""The functions rewritten graphs call: collectives as custom ops, sequence-parallel attention, PipeFusion's
per-patch ops, and the region shells the compiler cuts out. Stateless: groups arrive as c10d group names,
the bytes they move go to the counter of the call that runs them (`comm.counting`)."""
