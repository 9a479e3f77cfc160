# SPDX-License-Identifier: Apache-2.0
"""ament_python package of sage_ros: colcon on a robot, pip -e on a machine without ROS."""

from glob import glob

from setuptools import find_packages, setup

package_name = 'sage_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    package_data={'sage_ros': ['py.typed'], 'sage_ros.core': ['imagenet_classes.txt']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/config', glob('config/*')),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='sage_ros maintainers',
    maintainer_email='maintainers@sage-ros.dev',
    description='Budgeted edge-cloud offloading of image classification (SAGE) for ROS 2.',
    license='Apache-2.0',
    python_requires='>=3.10',
    entry_points={
        'console_scripts': [
            'sage-ros = sage_ros.cli:main',
            'sage_edge = sage_ros.nodes.edge_node:main',
            'sage_cloud = sage_ros.nodes.cloud_node:main',
            'sage_router = sage_ros.nodes.router_node:main',
        ],
    },
)
