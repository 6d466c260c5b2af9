#!/bin/sh
# First start of the database container (official postgres image or deploy/postgres): create the
# role and database pacsbridge uses, owned by that role, unless they exist. The password is
# POSTGRES_PASSWORD (the same one docker-compose.yml puts into PACSBRIDGE_DATABASE_URL), or
# PACSBRIDGE_DB_PASSWORD when set. Safe to run again.
set -eu
db_user="${PACSBRIDGE_DB_USER:-pacsbridge}"
db_name="${PACSBRIDGE_DB_NAME:-pacsbridge}"
db_password="${PACSBRIDGE_DB_PASSWORD:-${POSTGRES_PASSWORD:?}}"

psql -v ON_ERROR_STOP=1 -q --username "${POSTGRES_USER:-postgres}" --dbname postgres \
     -v db_user="$db_user" -v db_name="$db_name" -v db_password="$db_password" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'db_user', :'db_password')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'db_user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db_name', :'db_user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db_name') \gexec
SELECT format('GRANT ALL PRIVILEGES ON DATABASE %I TO %I', :'db_name', :'db_user') \gexec
SQL
echo "pacsbridge database: role $db_user, database $db_name"
