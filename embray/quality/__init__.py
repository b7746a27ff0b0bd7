"""Quality: retrieval measures and gates, shadow traffic, the monitor, cost estimates."""
