"""The compiler: capture a forward as torch.fx graphs and rewrite them for a mesh (passes, stage cut, regions).

Nothing here touches a live process group: passes see a `Mesh` (degrees and group names) and write calls to
`xdit_fx.ops` into the graph.
"""
