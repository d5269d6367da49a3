"""What runs after a batch's sub-tasks: the aggregate task, batch metrics, the sweeper."""
