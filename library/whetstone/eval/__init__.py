"""whetstone.eval"""
