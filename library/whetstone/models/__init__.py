"""whetstone.models"""
