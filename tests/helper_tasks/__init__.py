"""Task modules that end-to-end tests load in worker processes by ``package.module:attr`` spec."""
