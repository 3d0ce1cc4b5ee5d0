"""whetstone.losses"""
