"""The console commands: relion_graphsplit (graphsplit, job), relion_graphsplit_simulate (simulate),
relion_graphsplit_report (report), all started through launch."""
