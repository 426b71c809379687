import dagster as dg

datasets_partitions = dg.DynamicPartitionsDefinition(name="datasets")
