"""Methods turn sites and their weights into a QuantPlan. They never touch the graph.

One module per method (rtn, rotate, cafeq, gptq/gptaq, cafeq+gptaq), each an object of the registry
(:func:`qcompiler.methods.registry.get_method`) that says what it needs and plans from a
:class:`~qcompiler.methods.base.PlanContext`."""
