# SPDX-License-Identifier: Apache-2.0
"""Deployment security with Zenoh's own mechanisms: a CA and certificates for mutual TLS,
user/password credentials, and the router's access control list.

``write_deployment`` makes everything a deployment needs in one folder: the CA, the cloud's
and each robot's certificate and key, a credentials file, and Zenoh configs for the router,
the cloud node and each robot. Private keys are written 0600 and never leave that folder.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLOUD_NAME = 'sage-cloud'
_DAYS = 825


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'wb') as fh:
        fh.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'sage_ros'),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(out: Path, *, cn: str = 'sage_ros deployment CA') -> Issued:
    """A self-signed CA (EC P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    issued = Issued(out / 'ca.pem', out / 'ca.key')
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, issued.key)
    return issued


def issue(ca: Issued, out: Path, cn: str, *, hosts: Sequence[str] = ()) -> Issued:
    """A certificate for ``cn`` signed by ``ca``, usable as TLS server and client; ``hosts``
    (DNS names or IP addresses) go into the subject alternative names."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName(cn)]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    issued = Issued(out / f'{cn}.pem', out / f'{cn}.key')
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, issued.key)
    return issued


def acl(robots: Sequence[str], *, request: str = 'sage/patch_set', answer: str = 'sage/cloud_result') -> dict:
    """Router ACL: each robot may only put its own requests and receive its own answers; the
    cloud may receive every request and answer every robot. Everything else is denied.

    Subjects match a TLS certificate's common name or a user name, so the same ACL serves
    mutual TLS and user/password deployments."""
    rules = [
        {'id': 'cloud_in', 'permission': 'allow', 'flows': ['ingress'], 'messages': ['declare_subscriber', 'put'],
         'key_exprs': [f'**/{request}', f'**/{answer}']},
        {'id': 'cloud_out', 'permission': 'allow', 'flows': ['egress'], 'messages': ['put', 'declare_subscriber'],
         'key_exprs': [f'**/{request}', f'**/{answer}']},
    ]
    # Attributes listed in one subject must all match, so certificate and user name are two
    # subjects of the same policy (mutual TLS gives a common name, usrpwd a user name).
    subjects = [{'id': 'cloud_cert', 'cert_common_names': [CLOUD_NAME]}, {'id': 'cloud_user', 'usernames': [CLOUD_NAME]}]
    policies = [{'id': 'cloud', 'rules': ['cloud_in', 'cloud_out'], 'subjects': ['cloud_cert', 'cloud_user']}]
    for r in robots:
        rules += [
            {'id': f'{r}_in', 'permission': 'allow', 'flows': ['ingress'], 'messages': ['put'],
             'key_exprs': [f'{r}/{request}']},
            {'id': f'{r}_in_sub', 'permission': 'allow', 'flows': ['ingress'], 'messages': ['declare_subscriber'],
             'key_exprs': [f'{r}/{answer}']},
            {'id': f'{r}_out', 'permission': 'allow', 'flows': ['egress'], 'messages': ['put'],
             'key_exprs': [f'{r}/{answer}']},
            # The cloud's subscription (**/request) must reach the robot, or its publisher never
            # learns anyone listens; it carries no data.
            {'id': f'{r}_out_sub', 'permission': 'allow', 'flows': ['egress'], 'messages': ['declare_subscriber'],
             'key_exprs': [f'**/{request}']},
        ]
        subjects += [{'id': f'{r}_cert', 'cert_common_names': [r]}, {'id': f'{r}_user', 'usernames': [r]}]
        policies.append({'id': r, 'rules': [f'{r}_in', f'{r}_in_sub', f'{r}_out', f'{r}_out_sub'],
                         'subjects': [f'{r}_cert', f'{r}_user']})
    return {'enabled': True, 'default_permission': 'deny', 'rules': rules, 'subjects': subjects,
            'policies': policies}


# A robot id is its ROS namespace (one token) and a Zenoh key chunk: letters, digits and
# underscores, not starting with a digit (ROS name rules, which also exclude every Zenoh
# special character: / * $ # ?).
_ROBOT_ID = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
# Names whose files the deployment itself writes: a robot by that name would overwrite them.
RESERVED = ('ca', CLOUD_NAME, 'credentials', 'router', 'cloud')


class DeploymentError(ValueError):
    """A deployment that must not be written (a bad robot id, an existing CA)."""


def check_robot_ids(robots: Sequence[str]) -> None:
    """Refuse ids that are reserved, repeated, or not valid ROS namespaces and Zenoh key chunks."""
    if not robots:
        raise DeploymentError('give at least one robot id')
    seen: set[str] = set()
    for r in robots:
        if r.lower() in RESERVED:
            raise DeploymentError(f'robot id {r!r} is reserved (its files would overwrite the '
                                  f'{"CA" if r.lower() == "ca" else "cloud"}\'s); reserved: {", ".join(RESERVED)}')
        if not _ROBOT_ID.match(r):
            raise DeploymentError(f'robot id {r!r} is not a valid ROS namespace and Zenoh key chunk '
                                  '(letters, digits and _, not starting with a digit)')
        if r in seen:
            raise DeploymentError(f'robot id {r!r} is given twice')
        seen.add(r)


def write_deployment(out: Path, *, robots: Sequence[str], cloud_hosts: Sequence[str], port: int = 7447,
                     listen_host: str = '0.0.0.0', force: bool = False) -> dict[str, Path]:
    """CA, certificates, credentials and Zenoh configs for a TLS deployment (see module doc):
    every file written, by a short name ('ca', 'ca_key', 'robot1_cert', 'robot1', ...).

    An existing CA in ``out`` is never replaced without ``force``: every certificate it signed
    would stop working.
    """
    check_robot_ids(robots)
    if (out / 'ca.key').exists() and not force:
        raise DeploymentError(f'{out} already holds a CA (ca.key); replacing it invalidates every certificate '
                              'it signed. Use another --out, or --force to replace it')
    out.mkdir(parents=True, exist_ok=True)
    ca = make_ca(out)
    cloud = issue(ca, out, CLOUD_NAME, hosts=cloud_hosts)
    passwords = {name: secrets.token_urlsafe(18) for name in (CLOUD_NAME, *robots)}
    creds = out / 'credentials.txt'
    fd = os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as fh:
        fh.writelines(f'{u}:{p}\n' for u, p in passwords.items())
    host = cloud_hosts[0] if cloud_hosts else '127.0.0.1'
    files = {'ca': ca.cert, 'ca_key': ca.key, 'cloud_cert': cloud.cert, 'cloud_key': cloud.key,
             'credentials': creds}
    router = {
        'mode': 'router',
        'listen': {'endpoints': [f'tls/{listen_host}:{port}']},
        'scouting': {'multicast': {'enabled': False}},
        'transport': {
            'shared_memory': {'enabled': False},
            'link': {'tls': {'root_ca_certificate': str(ca.cert), 'listen_certificate': str(cloud.cert),
                             'listen_private_key': str(cloud.key), 'enable_mtls': True}},
        },
        'access_control': acl(robots),
    }
    files['router'] = _write_json(out / 'zenoh_router.json5', router)

    def client(name: str, issued: Issued) -> dict:
        return {
            'mode': 'client',
            'connect': {'endpoints': [f'tls/{host}:{port}'], 'timeout_ms': -1},
            'scouting': {'multicast': {'enabled': False}},
            'transport': {
                'shared_memory': {'enabled': False},
                'link': {'tls': {'root_ca_certificate': str(ca.cert), 'connect_certificate': str(issued.cert),
                                 'connect_private_key': str(issued.key), 'enable_mtls': True}},
            },
        }

    files['cloud'] = _write_json(out / 'zenoh_cloud.json5', client(CLOUD_NAME, cloud))
    for r in robots:
        issued = issue(ca, out, r)
        files[f'{r}_cert'], files[f'{r}_key'] = issued.cert, issued.key
        files[r] = _write_json(out / f'zenoh_{r}.json5', client(r, issued))

    # The lighter alternative: TLS authenticates the cloud only, robots log in with a password.
    router_pw = json.loads(json.dumps(router))
    router_pw['transport']['link']['tls']['enable_mtls'] = False
    router_pw['transport']['auth'] = {'usrpwd': {'dictionary_file': str(creds)}}
    files['router_usrpwd'] = _write_json(out / 'zenoh_router_usrpwd.json5', router_pw)

    def client_pw(name: str) -> dict:
        doc = client(name, cloud)
        doc['transport']['link']['tls'] = {'root_ca_certificate': str(ca.cert)}
        doc['transport']['auth'] = {'usrpwd': {'user': name, 'password': passwords[name]}}
        return doc

    files['cloud_usrpwd'] = _write_json(out / 'zenoh_cloud_usrpwd.json5', client_pw(CLOUD_NAME), private=True)
    for r in robots:
        files[f'{r}_usrpwd'] = _write_json(out / f'zenoh_{r}_usrpwd.json5', client_pw(r), private=True)
    return files


def _write_json(path: Path, doc: dict, *, private: bool = False) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, 'w') as fh:
        json.dump(doc, fh, indent=2)
    return path
