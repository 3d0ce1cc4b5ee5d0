"""whetstone.index"""
