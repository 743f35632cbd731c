-- lambda-pool: the database user the functions log in as, and its grants.
--
-- Run as the master user (or any role with CREATEROLE that owns the schema),
-- connected to the application database, with TLS:
--
--   psql "host=HOST port=5432 dbname=app user=lambda_pool_admin sslmode=require" \
--        -v app_user=app -v auth=iam -f infra/database.sql
--
-- infra/scripts/create-db-user.sh does this for a deployed stack (through the RDS
-- Data API for the cluster the stack created, or psql otherwise) and picks `auth`
-- from the stack's parameters.
--
-- Variables:
--   app_user      database user name (template parameter DatabaseUser); default app
--   auth          iam      - log in with RDS IAM tokens only (GRANT rds_iam).
--                            For AuthMode=iam without RDS Proxy.
--                 password - log in with the password kept in Secrets Manager
--                            (AuthMode=secret, and every RDS Proxy setup: the proxy
--                            logs in to the database with the secret's password).
--   app_password  the password, for auth=password. Pass it on standard input
--                 (\set app_password '...') rather than -v, so it stays out of the
--                 process list.
--
-- A role that has rds_iam can no longer log in with a password: PostgreSQL on RDS
-- sends it down the IAM path. That is why the two modes exclude each other.

\set ON_ERROR_STOP on

\if :{?app_user}
\else
  \set app_user app
\endif
\if :{?auth}
\else
  \set auth iam
\endif

SELECT :'auth' = 'iam' AS use_iam,
       :'auth' = 'password' AS use_password,
       NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'app_user') AS need_role,
       current_database() AS db_name
\gset

\if :use_iam
\elif :use_password
  \if :{?app_password}
  \else
    DO $$ BEGIN RAISE EXCEPTION 'auth=password needs the app_password variable'; END $$;
  \endif
\else
  DO $$ BEGIN RAISE EXCEPTION 'auth must be iam or password'; END $$;
\endif

BEGIN;

\if :need_role
  CREATE ROLE :"app_user" LOGIN;
\endif

\if :use_iam
  GRANT rds_iam TO :"app_user";
\else
  -- Only if it has it: REVOKE of a role never granted merely warns, but keep logs clean.
  SELECT EXISTS (
           SELECT 1 FROM pg_auth_members m
           JOIN pg_roles r ON r.oid = m.roleid AND r.rolname = 'rds_iam'
           JOIN pg_roles u ON u.oid = m.member AND u.rolname = :'app_user'
         ) AS has_rds_iam
  \gset
  \if :has_rds_iam
    REVOKE rds_iam FROM :"app_user";
  \endif
  ALTER ROLE :"app_user" PASSWORD :'app_password';
\endif

-- A Lambda environment can be frozen, then dropped, in the middle of a transaction
-- (timeout, crash). Without a limit that session keeps its locks until the server's
-- keepalives notice. Role defaults apply at login, so they do not pin a proxy session
-- the way a SET would.
ALTER ROLE :"app_user" SET idle_in_transaction_session_timeout = '60s';

GRANT CONNECT ON DATABASE :"db_name" TO :"app_user";
-- The samples create their own tables; PostgreSQL 15+ no longer lets every role
-- create in schema public.
GRANT USAGE, CREATE ON SCHEMA public TO :"app_user";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app_user";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"app_user";
ALTER DEFAULT PRIVILEGES IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_user";
ALTER DEFAULT PRIVILEGES IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO :"app_user";

COMMIT;

\echo 'database user' :"app_user" 'ready for' :auth 'authentication in' :"db_name"
